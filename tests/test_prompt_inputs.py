"""vLLM's prompt shapes through `LLM.generate` on a tiny LLaVA: `{"prompt", "multi_modal_data"}` gives
transformers' processor's prompt ids and greedy tokens (BOS included when the tokenizer adds one),
`{"prompt_token_ids", ...}` the same, lists mix every shape, and bad prompts name what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.prompt_inputs import is_one_prompt, prompt_input
from jaxrs.vision.media import MediaPolicy
from tests.test_vision_llava import generate_hf
from tests.vision_models import IMAGE_TOKEN_ID, random_image, tiny_llava

GREEDY = SamplingParams(temperature=0, max_tokens=5)
TEXT = "w5 <image> w7 w8"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The tiny LLaVA folder and its torch model, and a copy whose tokenizer adds BOS."""
    path = tmp_path_factory.mktemp("llava")
    model = tiny_llava(path)
    with_bos = tmp_path_factory.mktemp("llava-bos")
    shutil.copytree(path, with_bos, dirs_exist_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text()) | {"add_bos_token": True}
    (with_bos / "tokenizer_config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))  # as Llama's tokenizer.json adds BOS
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(with_bos / "tokenizer.json"))
    return path, with_bos, model


def reference(folder, model, text, image):
    from transformers import AutoProcessor

    ref = AutoProcessor.from_pretrained(folder)(text=text, images=image, return_tensors="np")
    ids = ref["input_ids"][0].tolist()
    return ids, generate_hf(model, ids, ref["pixel_values"], GREEDY.max_tokens)[0]


@pytest.mark.parametrize("bos", [False, True])
def test_text_prompt_with_an_image_is_transformers(llava, bos):
    path, with_bos, model = llava
    folder = with_bos if bos else path
    llm = LLM(str(folder), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8)
    image = random_image(40, 30, seed=3)
    ids, tokens = reference(folder, model, TEXT, image)
    assert (ids[0] == 1) == bos
    [out] = llm.generate({"prompt": TEXT, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)
    assert out.prompt == TEXT and out.prompt_token_ids == ids and out.outputs[0].token_ids == tokens
    by_ids = {"prompt_token_ids": [*([1] if bos else []), 5, IMAGE_TOKEN_ID, 7, 8]}
    mixed = llm.generate(
        [by_ids | {"multi_modal_data": {"image": [image]}}, {"prompt": "w5 w7"}, "w5 w7", [5, 7]],
        GREEDY,
        use_tqdm=False,
    )
    assert mixed[0].prompt is None and mixed[0].outputs[0].token_ids == tokens
    assert mixed[1].prompt == mixed[2].prompt == "w5 w7"
    assert mixed[1].outputs[0].token_ids == mixed[2].outputs[0].token_ids
    if not bos:
        assert mixed[3].outputs[0].token_ids == mixed[2].outputs[0].token_ids
    with pytest.raises(JaxrsError, match="prompt_logprobs"):
        llm.generate(
            {"prompt": TEXT, "multi_modal_data": {"image": image}}, SamplingParams(prompt_logprobs=1)
        )


def test_bad_prompts_name_the_problem(llava):
    path, _, _ = llava
    from jaxrs.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_folder(path)
    policy = MediaPolicy()
    image = random_image(10, 10)
    cases = [
        ({"text": "w5"}, "unsupported prompt keys"),
        ({}, "needs"),
        ({"prompt": "w5", "multi_modal_data": {"video": 1}}, "multi_modal_data"),
        ({"prompt": "w5", "multi_modal_data": {"image": image}}, "text-only"),
    ]
    for prompt, words in cases:
        with pytest.raises(JaxrsError, match=words):
            prompt_input(prompt, tokenizer, None, policy)
    assert prompt_input({"prompt": "w5 w6"}, tokenizer, None, policy).ids == [5, 6]
    both = prompt_input({"prompt": "w5", "prompt_token_ids": [7]}, tokenizer, None, policy)
    assert (both.text, both.ids) == ("w5", [7])  # vLLM's TokensPrompt: the ids fed, the text reported
    assert is_one_prompt({"prompt": "x"}) and is_one_prompt("x") and is_one_prompt([1, 2])
    assert not is_one_prompt([{"prompt": "x"}]) and not is_one_prompt([[1, 2]]) and not is_one_prompt([])
    assert np.array_equal(prompt_input([5, 6], tokenizer, None, policy).ids, [5, 6])


def test_an_image_without_its_marker_is_refused(llava):
    path, _, _ = llava
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8)
    with pytest.raises(JaxrsError, match="image"):
        llm.generate({"prompt": "w5 w6", "multi_modal_data": {"image": random_image(10, 10)}}, GREEDY)


def test_a_cache_salt_shares_the_prefix_cache_only_within_the_salt(structured_llm):
    """vLLM's `{"prompt": ..., "cache_salt": ...}`: a cached prompt is found again under its own salt,
    never under another or none."""
    text = "a prompt long enough to fill a few prefix-cache blocks, " * 2
    one = SamplingParams(temperature=0, max_tokens=1)

    def cached(prompt: dict) -> int:
        return structured_llm.generate(prompt, one, use_tqdm=False)[0].num_cached_tokens

    salts = [{"cache_salt": s} for s in ("tenant-a", "tenant-b")]
    assert cached({"prompt": text} | salts[0]) == 0
    assert cached({"prompt": text} | salts[1]) == 0
    assert cached({"prompt": text}) == 0
    assert cached({"prompt": text} | salts[0]) > 0
    assert cached({"prompt_token_ids": structured_llm.tokenizer.encode(text)} | salts[1]) > 0
    with pytest.raises(JaxrsError, match="cache_salt must be a non-empty string"):
        structured_llm.generate({"prompt": text, "cache_salt": ""}, one, use_tqdm=False)
    assert not structured_llm.engine.has_unfinished()
