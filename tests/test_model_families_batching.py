"""Every family's tiny configs through the whole engine: prompts batched give the tokens each gives alone."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from tests import test_llama, test_model_families, test_model_families_2
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

CONFIGS = {**test_llama.CONFIGS, **test_model_families.CONFIGS, **test_model_families_2.CONFIGS}
PROMPTS = [list(range(5, 12)), list(range(40, 75)), list(range(100, 119))]  # 7, 35, 19 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def generate(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0
    return [r.seqs[0].output_ids for r in requests]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_alone(name, tmp_path):
    save_tiny_hf_model(CONFIGS[name], tmp_path, seed=3)
    save_tiny_tokenizer(tmp_path, CONFIGS[name].vocab_size)
    loaded = load_model(str(tmp_path))
    engine = Engine(
        loaded,
        EngineConfig(
            kv_cache_tokens=512, block_size=8, max_model_len=128, max_decode_steps=4, prefix_caching=False
        ),
        dtype=jnp.float32,
    )
    together = generate(engine, PROMPTS)
    alone = [generate(engine, [p])[0] for p in PROMPTS]
    assert together == alone


def test_longrope_models_do_not_reuse_cached_blocks(tmp_path):
    """Cached keys do not record which LongRoPE factor set rotated them, so the cache stays off."""
    save_tiny_hf_model(CONFIGS["phi3-longrope-switch"], tmp_path, seed=3)
    save_tiny_tokenizer(tmp_path, CONFIGS["phi3-longrope-switch"].vocab_size)
    engine = Engine(
        load_model(str(tmp_path)), EngineConfig(kv_cache_tokens=512, prefix_caching=True), dtype=jnp.float32
    )
    assert not engine.blocks.prefix_caching
