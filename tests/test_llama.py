"""Llama-family logits against transformers (CPU torch, f32) through the paged KV cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from transformers import LlamaConfig, MistralConfig

from jaxrs.config import RopeScaling
from jaxrs.loading import checkpoint
from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
from tests.conftest import relative_error, save_tiny_hf_model
from tests.paged import PagedRun, assert_matches_transformers

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256
)
CONFIGS = {
    "mha-untied": LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
    ),
    "gqa-tied-llama3-rope": LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "gqa8-headdim-bias-linear-rope": LlamaConfig(
        **SMALL,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=32,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_theta=500.0,
    ),
    # transformers' Llama/Mistral RoPE rotates whole heads whatever partial_rotary_factor says
    "mistral-no-window": MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=None, partial_rotary_factor=0.5
    ),
}
# Dynamic NTK past max_position_embeddings (16): the base grows with each sequence's length, so keys in
# the cache keep the base they were written with (compared with transformers' cached decoding).
DYNAMIC = LlamaConfig(
    **(SMALL | {"max_position_embeddings": 16}),
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"rope_type": "dynamic", "factor": 4.0},
)
PROMPT_LEN, DECODE_STEPS = 32, 8


def load_params(path, dtype=np.float32):
    cfg = load_hf_config(path)
    get = open_hf_tensors(path, checkpoint.hf_weight_names(cfg))
    return cfg, checkpoint.load_params(get, cfg, dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name, tmp_path):
    ref = save_tiny_hf_model(CONFIGS[name], tmp_path, seed=len(name))
    cfg, params = load_params(tmp_path)
    assert_matches_transformers(name, cfg, params, ref, PROMPT_LEN, DECODE_STEPS)


def test_chunked_prefill_equals_whole_prompt(tmp_path):
    save_tiny_hf_model(CONFIGS["gqa-tied-llama3-rope"], tmp_path)
    cfg, params = load_params(tmp_path)
    prompt = np.random.default_rng(2).integers(0, 256, 40).tolist()
    whole = PagedRun(cfg, params, block_size=8, seed=1).feed(prompt)
    chunked = PagedRun(cfg, params, block_size=8, seed=2)
    parts = [chunked.feed(prompt[:13]), chunked.feed(prompt[13:16]), chunked.feed(prompt[16:])]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_stays_close(tmp_path):
    import jax.numpy as jnp

    save_tiny_hf_model(CONFIGS["mha-untied"], tmp_path)
    cfg, params32 = load_params(tmp_path)
    _, params16 = load_params(tmp_path, jnp.bfloat16)
    prompt = list(range(1, 30))
    f32 = PagedRun(cfg, params32).feed(prompt)
    bf16 = PagedRun(cfg, params16, dtype=jnp.bfloat16).feed(prompt)
    assert relative_error(bf16, f32) < 0.05


def test_dynamic_ntk_matches_cached_transformers(tmp_path):
    """Prompt logits and greedy steps past max_position_embeddings against transformers' cached decoding
    (each step's base from the length so far); a plain RoPE run would differ."""
    from tests.test_model_families_2 import transformers_greedy

    ref = save_tiny_hf_model(DYNAMIC, tmp_path, seed=5)
    cfg, params = load_params(tmp_path)
    assert cfg.rope_scaling.kind == "dynamic" and cfg.rope_scaling.by_length
    prompt = np.random.default_rng(1).integers(0, 256, 20).tolist()
    theirs, ids = transformers_greedy(ref, prompt, 4, cached=True)
    run = PagedRun(cfg, params, block_size=8, seed=3)
    ours = [run.feed(prompt)]
    for token in ids[len(prompt) :]:
        assert int(np.argmax(ours[-1][-1])) == token
        ours.append(run.feed([token]))
    assert relative_error(np.concatenate(ours), np.concatenate(theirs)) <= 1e-4
    plain = dataclasses.replace(cfg, rope_scaling=RopeScaling())
    assert relative_error(PagedRun(plain, params, block_size=8).feed(prompt), theirs[0]) > 1e-3
