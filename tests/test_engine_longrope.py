"""LongRoPE and dynamic-NTK models keep prefix caching off: cached keys do not record which factor set
(which base) rotated them."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.loading import load_model
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.test_llama import DYNAMIC
from tests.test_model_families_2 import CONFIGS

BY_LENGTH = {"longrope": CONFIGS["phi3-longrope-switch"], "dynamic": DYNAMIC}


@pytest.mark.parametrize("kind", list(BY_LENGTH))
def test_length_dependent_rope_does_not_reuse_cached_blocks(kind, tmp_path):
    """Cached keys do not record which LongRoPE factor set (dynamic NTK base) rotated them."""
    config = BY_LENGTH[kind]
    save_tiny_hf_model(config, tmp_path, seed=3)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    engine = Engine(
        load_model(str(tmp_path)), EngineConfig(kv_cache_tokens=512, prefix_caching=True), dtype=jnp.float32
    )
    assert engine.model.config.rope_scaling.kind == kind
    assert not engine.blocks.prefix_caching
