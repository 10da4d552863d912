"""The decoder's two layer loops: weights split per layer (`unstack_layers`, run unrolled) against the
stacked ones under `lax.scan`. The families' transformers tests run the scanned loop (their trees come
straight from the loader); here the unrolled loop meets transformers for the layer kinds it resolves in
Python instead (mixed sliding windows, a local RoPE base, LongRoPE) and a sparse MoE."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrs.loading import load_model
from jaxrs.models.decoder import stack_layers, unstack_layers
from jaxrs.quant import QuantizedTensor
from tests import test_model_families, test_model_families_2
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config
from tests.paged import PagedRun, assert_matches_transformers

CASES = {
    name: configs[name]
    for configs, names in [
        (test_model_families.CONFIGS, ["qwen2-untied-window", "gemma3-sss-full"]),
        (test_model_families_2.CONFIGS, ["phi3-longrope-window", "mixtral-3-experts-window"]),
    ]
    for name in names
}


@pytest.mark.parametrize("name", list(CASES))
def test_unrolled_layers_match_transformers(name, tmp_path):
    ref = save_tiny_hf_model(CASES[name], tmp_path, seed=len(name))
    cfg, params = test_model_families.load_params(tmp_path)
    unstack_layers(params)
    assert isinstance(params["layers"], tuple) and len(params["layers"]) == cfg.num_layers
    assert_matches_transformers(name, cfg, params, ref, prompt_len=20, steps=4)


def test_packed_layers_split_and_stack_again_exactly(tmp_path):
    """A packed tree (ISQ Q8_0) split per layer: each layer's leaves are the stack's rows, the unrolled
    logits are the scanned ones, and stacking again gives the tree back bit for bit."""
    save_tiny_hf_model(tiny_llama_config(), tmp_path, seed=1)
    save_tiny_tokenizer(tmp_path, tiny_llama_config().vocab_size)
    model = load_model(str(tmp_path), isq="8")
    params = model.params
    original = jax.tree.map(np.asarray, params)
    ids = list(range(3, 30))
    scanned = PagedRun(model.config, params, num_blocks=8).feed(ids)

    unstack_layers(params)
    assert isinstance(params["layers"][1]["q_proj"], QuantizedTensor)
    for i, lp in enumerate(params["layers"]):
        for key, leaf in lp.items():
            row = jax.tree.map(lambda a, i=i: a[i], original["layers"][key])
            jax.tree.map(np.testing.assert_array_equal, leaf, row)
    unrolled = PagedRun(model.config, params, num_blocks=8).feed(ids)
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-5 * np.abs(scanned).max())

    stack_layers(params)
    assert jax.tree.structure(params) == jax.tree.structure(original)
    jax.tree.map(np.testing.assert_array_equal, params, original)
