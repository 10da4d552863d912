"""Idefics 2 against transformers: a tiny random Idefics2ForConditionalGeneration (tiny SigLIP and
perceiver, Mistral text model) with its processor saved beside it. Pixel values, pixel masks and prompt
ids equal the transformers processor's for odd sizes and extreme aspect ratios, with and without image
splitting; the tower's rows equal `get_image_features`; a prompt with an image gives transformers'
logits through jaxrs's Mistral (read from the same folder) fed the merged embeddings."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.loading import checkpoint
from jaxrs.loading.hf_folder import open_hf_tensors
from jaxrs.vision.idefics2 import (
    Idefics2Processor,
    idefics2_text_config,
    idefics2_text_tensor,
    load_idefics2_tower,
    resized_size,
)
from tests.conftest import relative_error, save_tiny_tokenizer
from tests.paged import PagedRun

transformers = pytest.importorskip("transformers")

# (width, height): odd sizes, below shortest_edge, above longest_edge, extreme ratios both ways
SIZES = [(37, 53), (64, 64), (97, 31), (300, 7), (5, 211), (1, 1), (129, 130)]
VOCAB = 256  # the word-level tokenizer; the processor adds 3 special tokens after it


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model and its processor (splitting on), saved as transformers saves them."""
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        PreTrainedTokenizerFast,
    )
    from transformers import Idefics2Processor as HFProcessor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    path = tmp_path_factory.mktemp("idefics2")
    save_tiny_tokenizer(path, VOCAB)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    images = Idefics2ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 64, "shortest_edge": 24}
    )
    processor = HFProcessor(images, tok, image_seq_len=4)
    cfg = Idefics2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
            patch_size=8,
        ),
        perceiver_config=dict(
            hidden_size=48, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
            resampler_head_dim=8, num_key_value_heads=2, rms_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="mistral", vocab_size=264, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


@pytest.fixture(scope="module")
def encode(folder):
    """The loaded tower as one jitted function of its state (as the engine runs it), and its config."""
    tower, cfg = load_idefics2_tower(folder[0])
    graph, state = nnx.split(tower)
    run = jax.jit(lambda state, px, mask: nnx.merge(graph, state)(px, pixel_attention_mask=mask))
    return lambda image: np.asarray(
        run(state, jnp.asarray(image.pixel_values), jnp.asarray(image.extras["pixel_attention_mask"]))
    ), cfg


def _ours(path, processor):
    return Idefics2Processor.from_folder(path, processor.tokenizer.get_vocab())


def _assert_padded_equal(ours: np.ndarray, ref: np.ndarray, what) -> None:
    """transformers' array in the corner of ours (padded to the shape bucket), zeros around it."""
    h, w = ref.shape[-2:]
    assert ours.shape[:-2] == ref.shape[:-2] and ours.shape[-2] >= h and ours.shape[-1] >= w, what
    np.testing.assert_array_equal(ours[..., :h, :w], ref, err_msg=str(what))
    rest = ours.copy()
    rest[..., :h, :w] = 0
    assert not rest.any(), what


@pytest.mark.parametrize("split", [True, False])
def test_processor_matches_transformers(folder, split):
    path, _, processor = folder
    ours = _ours(path, processor)
    ours = dataclasses.replace(ours, do_image_splitting=split)
    processor.image_processor.do_image_splitting = split
    try:
        for seed, (w, h) in enumerate(SIZES):
            image = _image(w, h, seed)
            if split and min(w, h) < 2:  # transformers divides by zero here; we refuse it by name
                with pytest.raises(JaxrsError, match="too small to split"):
                    ours(image)
                continue
            ref = processor(text="<image>", images=image, return_tensors="np")
            got = ours(image)
            _assert_padded_equal(got.pixel_values, ref["pixel_values"][0], (w, h))
            _assert_padded_equal(got.extras["pixel_attention_mask"], ref["pixel_attention_mask"][0], (w, h))
            assert got.pixel_values.shape[-1] % 16 == got.pixel_values.shape[-2] % 16 == 0  # 64 / 4
            assert list(got.prompt_tokens) == ref["input_ids"][0].tolist(), (w, h)
            assert got.feature_mask.sum() == (5 if split else 1) * 4
            np.testing.assert_array_equal(got.feature_mask, ref["input_ids"][0] == ours.image_token_id)
    finally:
        processor.image_processor.do_image_splitting = True


def test_processor_modes_and_hash(folder):
    """RGBA and grayscale images come out as the transformers processor gives them (alpha dropped, as its
    `load_image` does); the hash follows the pixels."""
    path, _, processor = folder
    ours = _ours(path, processor)
    rgba = _image(41, 29, 7, "RGBA")
    ref = processor(text="<image>", images=rgba, return_tensors="np")
    _assert_padded_equal(ours(rgba).pixel_values, ref["pixel_values"][0], "rgba")
    gray = _image(30, 50, 8, "L")
    ref = processor(text="<image>", images=gray, return_tensors="np")
    _assert_padded_equal(ours(gray).pixel_values, ref["pixel_values"][0], "gray")
    a, b = _image(20, 20, 1), _image(20, 20, 2)
    assert ours(a).content_hash == ours(a.copy()).content_hash != ours(b).content_hash
    assert len(ours(a).content_hash) == 32


def test_resized_size_edges():
    assert resized_size(100, 200, 64, 24) == (32, 64)  # width capped, height truncated
    assert resized_size(200, 7, 64, 24) == (64, 24)  # the narrow side raised to shortest_edge
    assert resized_size(10, 10, 64, 24) == (24, 24)


def test_from_folder_errors(folder, tmp_path):
    path, _, processor = folder
    with pytest.raises(ModelLoadError, match="<fake_token_around_image>"):
        Idefics2Processor.from_folder(path, {"<image>": 3})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelLoadError, match="not idefics2"):
        load_idefics2_tower(tmp_path)


def test_sparse_text_config_gets_mistral_defaults(tmp_path):
    """The published config lists only what differs from MistralConfig; Idefics2Config's overrides apply."""
    text = {"model_type": "mistral", "vocab_size": 32003, "sliding_window": None}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics2", "text_config": text}))
    cfg = idefics2_text_config(tmp_path)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == ("llama", 32003, 4096, 32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.sliding_window) == (32, 8, 1e-5, None)


def test_tower_matches_get_image_features(folder, encode):
    path, model, processor = folder
    encode, cfg = encode
    ours = _ours(path, processor)
    for seed, (w, h) in enumerate([(37, 53), (300, 7)]):
        image = ours(_image(w, h, seed))
        rows = encode(image)
        with torch.no_grad():
            ref = model.model.get_image_features(
                torch.from_numpy(image.pixel_values)[None],
                torch.from_numpy(image.extras["pixel_attention_mask"]).long()[None],
            ).pooler_output[0]
        assert rows.shape == (int(image.feature_mask.sum()), cfg.text_hidden_size)
        err = relative_error(rows, ref.numpy())
        assert err <= 1e-5, (w, h, err)


def test_prompt_logits_match_transformers(folder, encode):
    """Text, an image, text: jaxrs's Mistral over the merged embeddings gives transformers' logits, and
    the same greedy tokens for a few steps after it."""
    path, model, processor = folder
    encode, _ = encode
    ours = _ours(path, processor)
    picture = _image(37, 53, 3)  # the size the tower test compiled
    ref_inputs = processor(text="w5 w9 <image> w7 w3", images=picture, return_tensors="pt")
    with torch.no_grad():
        ref = model(**ref_inputs).logits[0].numpy()

    image = ours(picture)
    tokens = [5, 9, *image.prompt_tokens, 7, 3]
    assert tokens == ref_inputs["input_ids"][0].tolist()
    mask = np.zeros(len(tokens), bool)
    mask[2 : 2 + len(image.prompt_tokens)] = image.feature_mask
    rows = encode(image)
    cfg = idefics2_text_config(path)  # the Mistral family, read from the Idefics 2 folder itself
    names = checkpoint.hf_weight_names(cfg)
    get = open_hf_tensors(path, [idefics2_text_tensor(n) for n in names])
    params = checkpoint.load_params(lambda name: get(idefics2_text_tensor(name)), cfg, np.float32)
    embeds = np.asarray(params["embed"]["weight"])[tokens]
    embeds[mask] = np.asarray(rows)
    run = PagedRun(cfg, params, block_size=8, num_blocks=32, seed=3)
    logits = run.feed(tokens, embeds)
    assert logits.shape == ref.shape
    err = relative_error(logits, ref)
    print(f"idefics2 prompt logits: max relative error {err:.2e}")
    assert err <= 1e-4
    assert (logits.argmax(-1) == ref.argmax(-1)).all()

    ids, ours_next = ref_inputs["input_ids"], int(logits[-1].argmax())  # then greedy steps, each side its own
    for _ in range(3):
        ids = torch.cat([ids, torch.tensor([[ours_next]])], dim=1)
        with torch.no_grad():
            theirs = (
                model(
                    input_ids=ids,
                    pixel_values=ref_inputs["pixel_values"],
                    pixel_attention_mask=ref_inputs["pixel_attention_mask"],
                )
                .logits[0, -1]
                .numpy()
            )
        step = run.feed([ours_next])[-1]
        assert relative_error(step, theirs) <= 1e-4
        ours_next = int(step.argmax())
        assert ours_next == int(theirs.argmax())


# -- through the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(folder):
    from jaxrs import LLM

    path = folder[0]
    if not (path / "chat_template.jinja").exists():  # the word-level tokenizer's plain template
        (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return LLM(str(path), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8)


def _hf_greedy(model, inputs, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_loads_as_a_vision_family(llm):
    vision = llm.engine.model.vision
    assert vision is not None and vision.family.name == "idefics2" and vision.marker == "<image>"
    assert llm.engine.model.config.architecture == "llama"  # the Mistral text model


@pytest.mark.parametrize("count", [1, 2])
def test_chat_greedy_tokens_equal_transformers(folder, llm, count):
    """`LLM.chat` with one and with two images: transformers' prompt ids (its processor over the same
    rendered text) and its greedy tokens. The images share a size: one tower compile."""
    from jaxrs import SamplingParams

    _, model, processor = folder
    pictures = [_image(37, 53, 20 + k) for k in range(count)]
    content = [{"type": "text", "text": "w5 w9"}]
    for k, picture in enumerate(pictures):
        content += [{"type": "image", "image": picture}, {"type": "text", "text": f"w{7 + k} w3"}]
    messages = [{"role": "user", "content": content}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]

    text = "w5 w9\n" + "\n".join(f"<image>\nw{7 + k} w3" for k in range(count)) + " "
    ref = processor(text=text, images=pictures, return_tensors="pt")
    assert out.prompt_token_ids == ref["input_ids"][0].tolist()
    assert out.outputs[0].token_ids == _hf_greedy(model, ref, 6)


def test_adjacent_images_and_words_after_an_image_as_transformers(folder, llm):
    """Two images with nothing between share one boundary token; a word right after an image gets a
    space before it: transformers' ids, and its greedy tokens from them."""
    from jaxrs import SamplingParams
    from jaxrs.vision.prompt import assemble_prompt

    _, model, processor = folder
    vision = llm.engine.model.vision
    pictures = [_image(37, 53, 30 + k) for k in range(3)]
    text = "w5 <image><image>w7 w8<image>"
    ids, placed = assemble_prompt(llm.tokenizer, text, vision, [vision.processor(p) for p in pictures])
    ref = processor(text=text, images=pictures, return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert sum(int(im.feature_mask.sum()) for im in placed.images) == 3 * 5 * 4
    req = llm.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=5), images=placed)
    llm._run([req], False)
    assert req.seqs[0].output_ids == _hf_greedy(model, ref, 5)


def test_a_word_right_after_an_image_gets_a_space(folder):
    """The text the tokenizer sees (a word-level tokenizer ignores spaces, so this is checked on the
    text): a space goes between an image and a word, not before a tag, whitespace or another image."""
    path, _, processor = folder
    ours = _ours(path, processor)
    seen = []

    class Recording:
        def encode(self, text, add_special_tokens=True):
            seen.append(text)
            return [ours.image_token_id] * text.count("<image>")

    image = ours(_image(37, 53, 1))
    ours.assemble(Recording(), "a<image>b <image>\nc<image><image><end_of_utterance><image>", [image] * 5)
    assert seen == ["a<image> b <image>\nc<image><image><end_of_utterance><image>"]


def test_images_of_nearby_sizes_share_a_compiled_tower(llm):
    vision = llm.engine.model.vision
    vision.encode([vision.processor(_image(37, 53, 1))])
    before = vision.compile_count()
    for size in [(40, 50), (33, 49), (48, 64)]:
        vision.encode([vision.processor(_image(*size, 2))])
    assert vision.compile_count() == before


# HuggingFaceM4/idefics2-8b's published template: it indexes `message['content'][0]['type']`
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_the_published_template_gets_typed_parts_as_transformers(folder, llm):
    """Images before, between and after text, across two user turns: transformers' processor ids."""
    from jaxrs import SamplingParams

    _, _, processor = folder
    pictures = [_image(37, 53, 40 + k) for k in range(3)]
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": pictures[0]}, {"type": "text", "text": "w5 w9"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "w11"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "w6"},
                {"type": "image", "image": pictures[1]},
                {"type": "text", "text": "w7"},
                {"type": "image", "image": pictures[2]},
            ],
        },
    ]
    plain, llm.tokenizer.chat_template = llm.tokenizer.chat_template, IDEFICS2_TEMPLATE
    try:
        out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    finally:
        llm.tokenizer.chat_template = plain
    text = processor.apply_chat_template(
        messages, add_generation_prompt=True, chat_template=IDEFICS2_TEMPLATE
    )
    ref = processor(text=text, images=pictures, return_tensors="pt")
    assert out.prompt_token_ids == ref["input_ids"][0].tolist()
