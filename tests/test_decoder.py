"""The decoder's two layer loops: weights split per layer (`unstack_layers`, run unrolled) against the
stacked ones under `lax.scan`. The families' transformers tests run the scanned loop (their trees come
straight from the loader); here the unrolled loop meets transformers for the layer kinds it resolves in
Python instead (mixed sliding windows, a local RoPE base, LongRoPE) and a sparse MoE."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrs import LLM, SamplingParams
from jaxrs.loading import load_model
from jaxrs.loading.model_config import config_from_hf
from jaxrs.models import decoder
from jaxrs.models.decoder import DecoderModel, model_graph, stack_layers, unstack_layers
from jaxrs.models.registry import FAMILIES
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
    assert isinstance(params["layers"][1]["attn"]["q_proj"]["weight"], QuantizedTensor)
    for i, lp in enumerate(params["layers"]):
        row = jax.tree.map(lambda a, i=i: a[i], original["layers"])
        jax.tree.map(np.testing.assert_array_equal, lp, row)
    unrolled = PagedRun(model.config, params, num_blocks=8).feed(ids)
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-5 * np.abs(scanned).max())

    stack_layers(params)
    assert jax.tree.structure(params) == jax.tree.structure(original)
    jax.tree.map(np.testing.assert_array_equal, params, original)


ALL_CONFIGS = test_model_families.CONFIGS | test_model_families_2.CONFIGS


@pytest.mark.parametrize("unrolled", [False, True], ids=["stacked", "unrolled"])
def test_every_family_is_an_nnx_module_tree_that_round_trips(unrolled):
    """Each family's model is a `flax.nnx` module tree (one config per family); its state splits and
    merges back to the same graph and arrays, and the merged module computes what `forward` computes."""
    by_family = {}
    for raw in ALL_CONFIGS.values():
        cfg = config_from_hf(raw.to_dict(), Path("config.json"))
        by_family.setdefault(cfg.architecture, cfg)
    assert set(by_family) == set(FAMILIES)
    for arch, cfg in by_family.items():
        graph, abstract = model_graph(cfg, unrolled)
        rng = np.random.default_rng(0)
        state = jax.tree.map(
            lambda a, rng=rng: jnp.asarray(rng.normal(size=a.shape) * 0.1, jnp.float32), abstract
        )
        model = nnx.merge(graph, state)
        assert isinstance(model, DecoderModel) and isinstance(model.layers, nnx.List) == unrolled, arch
        graph2, state2 = nnx.split(model)
        assert graph2 == graph, arch
        assert jax.tree.structure(state2.to_pure_dict()) == jax.tree.structure(state), arch
        jax.tree.map(np.testing.assert_array_equal, state2.to_pure_dict(), state)
        params = dict(state)
        if unrolled:
            params["layers"] = tuple(state["layers"][i] for i in range(cfg.num_layers))
        run = PagedRun(cfg, params, num_blocks=8)
        logits = run.feed([1, 2, 3])
        assert logits.shape == (3, cfg.vocab_size) and np.isfinite(logits).all(), arch


def test_optional_pieces_follow_the_config_not_the_checkpoint():
    """Biases, q/k norms, sandwich norms and the head exist exactly where the family and config say."""
    cfgs = {name: config_from_hf(raw.to_dict(), Path("config.json")) for name, raw in ALL_CONFIGS.items()}
    layer = lambda name: model_graph(cfgs[name])[1]["layers"]  # noqa: E731
    assert (
        "bias" in layer("qwen2-tied")["attn"]["q_proj"]
        and "bias" not in layer("qwen2-tied")["attn"]["o_proj"]
    )
    assert "q_norm" in layer("gemma3")["attn"] and "q_norm" not in layer("gemma2")["attn"]
    assert "ffn_out_norm" in layer("gemma2") and "ffn_out_norm" not in layer("gemma")
    assert "gate_proj" not in layer("phi")["mlp"] and "post_attn_norm" not in layer("phi")
    assert "router" in layer("mixtral")["mlp"]
    assert "lm_head" not in model_graph(cfgs["qwen2-tied"])[1]
    assert "bias" in model_graph(cfgs["phi"])[1]["lm_head"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
def test_mixed_layer_kinds_leave_o_proj_in_its_stack(tmp_path, monkeypatch):
    """Sliding and global layers run o_proj inside the layer-kind conditional; a layer's slice handed to it
    was copied out of its stack first. A one-row decode step keeps the packed weights in their stacks, so
    no layer-sized copy of o_proj's codes exists (and the check sees the copy without the rule)."""
    config = test_model_families.CONFIGS["gemma3"]
    save_tiny_hf_model(config, tmp_path)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    llm = LLM(str(tmp_path), isq="Q8_0", kv_cache_tokens=256, block_size=8, max_model_len=64, max_num_seqs=2)
    runner = llm.engine.runner
    o_proj = runner.params["layers"]["attn"]["o_proj"]["weight"]
    assert isinstance(o_proj, QuantizedTensor) and o_proj.fmt == "Q8F"  # Q8_0 in its CPU layout
    layer_copy = re.compile(r"s8\[{},{}\]".format(*o_proj.out_in))

    def one_row_step() -> str:
        batch, flags = runner.profile_batch(SamplingParams(temperature=0), 1)
        zeros, tables = np.zeros(1, np.int32), np.zeros((1, runner.width(1, decode=True)), np.int32)
        inputs = (zeros, zeros, tables, np.ones(1, bool), batch, np.int32(1))
        statics = dict(cfg=runner.cfg, kernels=runner.kernels, flags=flags, max_steps=1)
        return runner.steps.decode.lower(runner.params, runner.kv, *inputs, **statics).compile().as_text()

    assert not layer_copy.search(one_row_step())
    monkeypatch.setattr(decoder, "IN_PLACE_UNDER_COND", False)
    jax.clear_caches()
    assert layer_copy.search(one_row_step()), "the check would not see the copy"
