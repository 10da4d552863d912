"""Packed weights in the device's layout whatever packed them: ISQ at load (and so a speculative draft's
ISQ copy and runtime re-ISQ) and pre-quantized folders move into the CPU layout as a packed GGUF does,
with the same values; `jaxrs quantize` keeps the formats themselves."""

from __future__ import annotations

import logging
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.cli import main
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from jaxrs.loading.device_layout import relaid_getter, relays_packed_weights
from jaxrs.ops import qmatmul_xla
from jaxrs.quant import QuantizedTensor, dequantize, quantize
from jaxrs.quant.tensor import tree_nbytes
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config

TINY = tiny_llama_config()  # rows of 256 and 512: Q4_K packs every matrix itself
ON_CPU = jax.default_backend() == "cpu"
cpu_only = pytest.mark.skipif(not ON_CPU, reason="the CPU layout is XLA:CPU's")
is_packed = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[3, 4, 5, 6, 7], list(range(10, 31)), [200, 9]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-layout")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return folder


def formats(params: dict) -> set[str]:
    return {leaf.fmt for leaf in jax.tree.leaves(params, is_leaf=is_packed) if is_packed(leaf)}


def greedy_tokens(loaded) -> list[list[int]]:
    engine = Engine(loaded, EngineConfig(kv_cache_mb=8, max_num_seqs=4), dtype=jnp.float32)
    requests = [engine.add_request(p, GREEDY) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    return [r.seqs[0].output_ids for r in requests]


@cpu_only
@pytest.mark.parametrize(("fmt", "layout"), [("Q4_0", "Q8F"), ("Q4K", "U8M")])
def test_isq_weights_take_the_cpu_layout_with_the_file_formats_values(tiny, fmt, layout, caplog):
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        relaid = load_model(str(tiny), isq=fmt)
    kept = load_model(str(tiny), isq=fmt, device_layout=False)
    file_fmt = kept.params["layers"]["attn"]["q_proj"]["weight"].fmt
    assert formats(kept.params) == {file_fmt, "Q8_0"}  # the matrices; the embedding and head
    assert formats(relaid.params) == {layout, "Q8F"}
    line = next(m for m in caplog.messages if m.startswith("packed weights in the exact layouts"))
    assert f"{file_fmt} -> {layout} (14 tensors)" in line and "Q8_0 -> Q8F (2 tensors)" in line
    # the bytes reported are the bytes held: a byte a code, more than the file formats' nibbles
    assert tree_nbytes(relaid.params) > tree_nbytes(kept.params)
    x = jax.random.normal(jax.random.key(0), (3, TINY.hidden_size), jnp.float32)
    leaves = zip(
        jax.tree.leaves(relaid.params, is_leaf=is_packed),
        jax.tree.leaves(kept.params, is_leaf=is_packed),
        strict=True,
    )
    for ours, theirs in leaves:
        if not is_packed(ours):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
            continue
        want = np.asarray(dequantize(theirs))
        np.testing.assert_array_equal(np.asarray(dequantize(ours)), want)  # the same values, exactly
        if ours.out_in[1] != TINY.hidden_size:
            continue
        one, dense = (ours[0], want[0]) if ours.ndim == 3 else (ours, want)  # a stacked layer: the first
        ref = np.asarray(x) @ dense.T
        for rows in (1, 3):  # the one-row product and a few-row one
            got = np.asarray(qmatmul_xla(x[:rows], one))
            np.testing.assert_allclose(got, ref[:rows], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert greedy_tokens(relaid) == greedy_tokens(kept)


def test_other_backends_and_device_layout_false_keep_the_formats(monkeypatch):
    assert relays_packed_weights() == ON_CPU
    assert not relays_packed_weights(device_layout=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not relays_packed_weights()


def test_the_getter_moves_packed_tensors_once_and_counts_them():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    tensors = {"a": quantize(w, "Q4_0"), "b": quantize(w, "Q4_1"), "c": quantize(w, "Q8F"), "n": w}
    moved: Counter[str] = Counter()
    get = relaid_getter(tensors.__getitem__, moved)
    got = {name: get(name) for name in tensors}
    assert [got[n].fmt for n in "abc"] == ["Q8F", "U8M", "Q8F"]
    assert got["n"] is tensors["n"] and got["c"] is tensors["c"]  # float, and already in the layout
    assert moved == Counter({"Q4_0 -> Q8F": 1, "Q4_1 -> U8M": 1})


@cpu_only
def test_quantize_writes_the_formats_and_the_folder_loads_in_the_cpu_layout(tiny, tmp_path, caplog):
    out = tmp_path / "q4_0"
    argv = ["--log-level", "WARNING", "quantize", "--model", str(tiny), "--isq", "Q4_0", "--out", str(out)]
    assert main(argv) == 0
    as_written = load_model(str(out), device_layout=False)
    assert formats(as_written.params) == {"Q4_0", "Q8_0"}  # the folder holds the formats themselves
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        served = load_model(str(out))
    assert formats(served.params) == {"Q8F"}
    assert any("Q4_0 -> Q8F (7 tensors)" in m for m in caplog.messages)  # stacked: one per parameter
    for ours, theirs in zip(
        jax.tree.leaves(served.params, is_leaf=is_packed),
        jax.tree.leaves(as_written.params, is_leaf=is_packed),
        strict=True,
    ):
        value = lambda t: np.asarray(dequantize(t) if is_packed(t) else t)  # noqa: E731
        np.testing.assert_array_equal(value(ours), value(theirs))
    in_memory = load_model(str(tiny), isq="Q4_0")  # the same tree as ISQ at load gives, bit for bit
    for ours, theirs in zip(jax.tree.leaves(served.params), jax.tree.leaves(in_memory.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
