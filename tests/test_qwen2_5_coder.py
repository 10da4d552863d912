"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (from the model catalog) against transformers reading
the same file: prompt logits, 32 greedy tokens through the engine, and the tokenizer with its chat
template rebuilt from the file's 151,936-token BPE vocabulary.

The numerics are chosen explicitly, whatever the defaults become: weights dequantized to f32 (not kept
packed) and an f32 KV cache, as transformers computes, so greedy tokens must agree exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import LoadedModel
from tests.conftest import relative_error
from tests.gemma3_gguf import dequantized_model, fetch_or_skip, open_source, transformers_model
from tests.paged import PagedRun
from tests.test_gguf_tokenizer import reference_tokenizer

pytestmark = pytest.mark.slow

QWEN = "Qwen2.5-Coder-0.5B-Instruct"
CHAT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


@pytest.fixture(scope="module")
def source():
    return open_source(fetch_or_skip(QWEN))


@pytest.fixture(scope="module")
def model(source) -> LoadedModel:
    return dequantized_model(source)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    return transformers_model(source[1], tmp_path_factory.mktemp("qwen2"), "model.gguf")


@pytest.fixture(scope="module")
def story(model, reference) -> tuple[list[int], list[int]]:
    """A chat prompt (our template and tokenizer) and transformers' 32 greedy tokens after it."""
    tok = model.tokenizer
    prompt = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    generated = out[0, len(prompt) :].tolist()
    assert len(generated) == 32  # no EOS: the comparison covers all 32 tokens
    return prompt, generated


def test_logits_match_transformers(model, reference, story):
    """Every position's logits over the prompt and the greedy continuation, ours fed in two chunks through
    the paged cache (f32), theirs in one pass."""
    cfg = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "qwen2",
        24,
        896,
        4864,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.rope_theta) == (14, 2, 151936, 1e6)
    assert not cfg.tie_word_embeddings
    prompt, generated = story
    run = PagedRun(cfg, model.params, block_size=16, num_blocks=8, seed=4, dtype=jnp.float32)
    ours = np.concatenate([run.feed(prompt), run.feed(generated)])
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt + generated])).logits[0].numpy()
    err = relative_error(ours, theirs)
    print(f"Qwen2.5-Coder-0.5B Q4_K_M GGUF: max relative logit error {err:.2e} over {len(ours)} tokens")
    assert err <= 1e-4


def test_32_greedy_tokens_match_transformers(model, story):
    """Through the engine (bucketed prefill, multi-step decode, on-device sampling, f32 KV cache) vs
    `generate`."""
    prompt, theirs = story
    config = EngineConfig(
        kv_cache_tokens=128, kv_cache_dtype="float32", max_model_len=128, max_num_seqs=1, prefix_caching=False
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
    "   leading spaces, and trailing ones   \n\n\n",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn {'a': [1, 2]}\n",
    "in 2024 we sold 1,234,567 units at $3.99; 0x7fff 1e-9",  # qwen2 splits digits one by one
    "café naïve Zürich 日本語のテキスト、中文字符，한국어 Привет مرحبا 😀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|><|endoftext|>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
]


def test_tokenizer_and_chat_template_match_transformers(model):
    """Special tokens, a few texts (code, digits, scripts, the chat and fill-in-the-middle markers, tool
    calls) and the chat template's ids against transformers' tokenizer for the file."""
    ours, ref = model.tokenizer, reference_tokenizer(model.source)
    assert (ours.eos_token, ours.pad_token, ours.eos_token_ids, ours.add_bos) == (
        "<|im_end|>",
        "<|endoftext|>",
        [151645],
        False,
    )
    assert (ref.eos_token, ref.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert ours.vocab_size == len(ref) == 151936
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
    prompt = ours.encode(ours.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    assert prompt == list(ref.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
