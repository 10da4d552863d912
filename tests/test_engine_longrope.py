"""LongRoPE models keep prefix caching off: cached keys do not record which factor set rotated them."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.loading import load_model
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.test_model_families_2 import CONFIGS


def test_longrope_models_do_not_reuse_cached_blocks(tmp_path):
    """Cached keys do not record which LongRoPE factor set rotated them, so the cache stays off."""
    save_tiny_hf_model(CONFIGS["phi3-longrope-switch"], tmp_path, seed=3)
    save_tiny_tokenizer(tmp_path, CONFIGS["phi3-longrope-switch"].vocab_size)
    engine = Engine(
        load_model(str(tmp_path)), EngineConfig(kv_cache_tokens=512, prefix_caching=True), dtype=jnp.float32
    )
    assert not engine.blocks.prefix_caching
