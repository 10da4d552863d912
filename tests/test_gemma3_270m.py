"""The real Gemma-3-270M Q4_K_M GGUF against transformers reading the same file: logits, 32 greedy tokens
through the engine, and the SentencePiece tokenizer rebuilt from the file's 262k-token vocabulary.

Both sides dequantize the weights to f32, so they compute the same function: greedy tokens must agree
exactly. The file holds the base (pretrained) model and no chat template.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrs.config import FULL
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import LoadedModel
from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf
from tests.conftest import relative_error
from tests.gemma3_gguf import (
    GEMMA3_FILE,
    dequantized_model,
    fetch_gemma3_270m,
    open_source,
    transformers_model,
)
from tests.paged import PagedRun
from tests.test_gguf_tokenizer import reference_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source():
    return open_source(fetch_gemma3_270m())


@pytest.fixture(scope="module")
def model(source) -> LoadedModel:
    return dequantized_model(source)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    return transformers_model(source[1], tmp_path_factory.mktemp("gemma3"), GEMMA3_FILE)


@pytest.fixture(scope="module")
def ref_tokenizer(source):
    return reference_tokenizer(str(source[0]))


@pytest.fixture(scope="module")
def story(model, reference) -> tuple[list[int], list[int]]:
    """A prompt and transformers' 32 greedy tokens after it (`generate`)."""
    prompt = model.tokenizer.encode("Once upon a time, in a small village by the sea,")
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    generated = out[0, len(prompt) :].tolist()
    assert len(generated) == 32  # no EOS
    return prompt, generated


def test_logits_match_transformers(model, reference, story):
    """Every position's logits over the prompt and the greedy continuation, ours fed in two chunks through
    the paged cache, theirs in one pass."""
    cfg = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.head_dim, cfg.vocab_size) == ("gemma3", 18, 256, 262144)
    assert cfg.layer_types.count(FULL) == 3 and cfg.sliding_window == 512 and cfg.rope_local_theta == 1e4
    prompt, generated = story
    run = PagedRun(cfg, model.params, block_size=16, num_blocks=4, seed=2)
    ours = np.concatenate([run.feed(prompt), run.feed(generated)])
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt + generated])).logits[0].numpy()
    err = relative_error(ours, theirs)
    print(f"Gemma 3 270M Q4_K_M GGUF: max relative logit error {err:.2e}")
    assert err <= 1e-4


def test_32_greedy_tokens_match_transformers(model, story):
    """Through the engine (bucketed prefill, multi-step decode, on-device sampling) vs `generate`."""
    prompt, theirs = story
    config = EngineConfig(
        kv_cache_tokens=128, max_model_len=128, max_num_seqs=1, prefix_caching=False, kv_cache_dtype="float32"
    )
    engine = Engine(model, config, dtype=jnp.float32)
    request = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    ours = request.seqs[0].output_ids
    print(repr(model.tokenizer.decode(ours)))
    assert ours == theirs


TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "",
    " ",
    "   leading spaces, and trailing ones   ",
    "a  b   c" + " " * 31 + "d" + " " * 17 + "e  ",  # runs of 2 to 31 spaces are tokens
    "\n",
    "one\ntwo\n\nthree\n\n\n\nfour\r\nfive\r\n",
    "tabs\tand\t\t\tmore tabs\t",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn {'a': [1, 2]}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "in 2024 we sold 1,234,567 units at $3.99; pi = 3.14159265, 0x7fff, 1e-9",
    "café naïve résumé Ångström façade Zürich ß İstanbul",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 ",
    "rare characters fall back to bytes: \x00\x07 \ue000 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "▁ is a character too: ▁▁ x ▁ ",  # the SentencePiece space mark written in the text
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "x<end_of_turn>y <start_of_turn <eos> <pad>[multimodal]",
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <h1>title</h1>",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_matches_transformers(model, ref_tokenizer, text):
    ours = model.tokenizer
    ids = ours.encode(text)
    assert ids == ref_tokenizer.encode(text)
    if "▁" not in text:  # SentencePiece's space mark decodes to a space
        assert ours.decode(ids[1:]) == text  # after the BOS
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_long_whitespace_runs_split_longest_first(model):
    """Runs of 2 to 31 spaces are user-defined pieces, which SentencePiece (and llama.cpp) match longest
    first: 40 spaces are 31 + 9. (transformers' GGUF loader makes them ordinary BPE pieces and merges 40
    spaces into 16 + 24, so for runs over 31 it is no reference.)"""
    tok = model.tokenizer
    ids = tok.encode("a" + " " * 40 + "b" + " " * 32 + "c", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["a", "▁" * 31, "▁" * 9, "b", "▁" * 31, "▁c"]


def test_tokenizer_special_tokens(model, ref_tokenizer):
    ours, ref = model.tokenizer, ref_tokenizer
    specials = ("<bos>", "<eos>", "<pad>", "<unk>")
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == specials
    assert (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token) == specials
    assert ours.add_bos and not ours.add_eos
    assert ours.vocab_size == len(ref) == 262144
    assert ours.eos_token_ids == [1, 106]  # <eos>, and <end_of_turn>: the end of a turn in Gemma's chat
    for i in (0, 1, 2, 5, 105, 106, 107, 138, 168, 238, 1000, 236764, 255968, 255999, 262143):
        assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
    assert ours.encode("<bos>Hi") == ref.encode("<bos>Hi")[1:]  # a BOS in the text is not doubled
    assert ours.chat_template is None  # a base model: prompts are completed as text


def test_instruction_tuned_name_gets_gemma_turns(source, ref_tokenizer, caplog):
    """The same file named as an instruction-tuned model gets the built-in Gemma turn format."""
    path, _, meta = source
    with caplog.at_level(logging.WARNING, logger="jaxrs"):
        tok = tokenizer_from_gguf({**meta, "general.finetune": "it"}, path)
    assert "no chat template in the file; using the built-in gemma turn format" in caplog.text
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<bos><start_of_turn>user\nAnswer in one word.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tok.encode(text)
    assert ids == ref_tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids[-3:] == [105, 4368, 107]  # <bos><start_of_turn> ... model\n
