"""A packed weight held in pieces along `in`: it reads as the whole weight everywhere, the `qmatmul` op
gives the whole weight's products (the same values at one row), and XLA:CPU's one-row product reads each
piece's own arrays rather than slices of whole rows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.ops import qmatmul_invariant, qmatmul_xla
from jaxrs.quant import dequantize, quantize, stack
from jaxrs.quant.in_pieces import InPieces, split_in
from jaxrs.quant.stacked_layer import scan_packed_in_place
from pallas_kernels.qmatmul import gemv_spans

LAYERS, OUT, IN = 2, 24, 4864  # Qwen2.5-0.5B's down_proj rows: two pieces for a one-row f32 product
SPANS = gemv_spans(IN, 32)


def whole(fmt: str = "U8M"):
    rng = np.random.default_rng(5)
    return stack([quantize(rng.standard_normal((OUT, IN)).astype(np.float32), fmt) for _ in range(LAYERS)])


def test_pieces_read_as_the_whole_weight():
    qt = whole()
    pieces = split_in(qt, SPANS)
    assert len(SPANS) == 2 and pieces.spans == SPANS
    assert pieces.shape == qt.shape and pieces.lead_shape == (LAYERS,) and pieces.nbytes == qt.nbytes
    for name, array in qt.arrays.items():
        np.testing.assert_array_equal(pieces.arrays[name], array)
    layer = pieces[1]
    assert isinstance(layer, InPieces) and layer.shape == (OUT, IN)
    np.testing.assert_array_equal(np.asarray(dequantize(layer)), np.asarray(dequantize(qt[1])))
    on_device = jax.device_put(pieces)
    leaves, treedef = jax.tree.flatten(on_device)
    assert len(leaves) == 2 * len(qt.arrays)  # each piece's own fields
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, InPieces) and again.spans == SPANS and again.fmt == qt.fmt
    np.testing.assert_array_equal(np.asarray(again.joined().arrays["qs"]), qt.arrays["qs"])
    with pytest.raises(ValueError, match="share a format"):
        InPieces([qt, whole("Q8F")])


def run_layers(weight, x, in_place: bool, **options):
    """`h <- h + 0.01 * (h @ W_l.T) @ P` over the layers under `lax.scan` (P maps OUT back to IN)."""
    back = jnp.asarray(np.random.default_rng(0).standard_normal((OUT, IN)), jnp.float32)

    def loop(x, w):
        scanned, layer_of = scan_packed_in_place(w) if in_place else (w, None)

        def body(h, xs):
            part, index = xs
            layer = layer_of(part, index) if layer_of else part
            return h + 0.01 * qmatmul_xla(h, layer, **options) @ back, None

        return jax.lax.scan(body, x, (scanned, jnp.arange(LAYERS, dtype=jnp.int32)))[0]

    return jax.jit(loop), (x, weight)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(("rows", "gemm"), [(1, None), (2, None), (5, None), (8, jnp.bfloat16)])
def test_products_in_pieces_are_the_whole_weights(rows, gemm, in_place):
    qt = jax.device_put(whole())
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, IN)), jnp.float32)
    options = {"gemm_dtype": gemm} if gemm else {}
    fn, args = run_layers(split_in(qt, SPANS), x, in_place, **options)
    ours = np.asarray(fn(*args))
    fn, args = run_layers(qt, x, in_place, **options)
    want = np.asarray(fn(*args))
    if rows == 1 and jax.default_backend() == "cpu":  # the whole weight's one row: the same spans
        np.testing.assert_array_equal(ours, want)
    else:  # partial sums over the pieces round apart from one sum over `in` (and move the next layer's
        # bfloat16 operands by an ulp here and there)
        np.testing.assert_allclose(ours, want, rtol=0, atol=(1e-3 if gemm else 2e-6) * np.abs(want).max())


def test_a_kernel_that_takes_the_weight_whole_gets_the_pieces_joined():
    qt = jax.device_put(whole("Q8_0"))[0]
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, IN)), jnp.float32)
    ours = jax.jit(qmatmul_invariant)(x, split_in(qt, SPANS))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.jit(qmatmul_invariant)(x, qt)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
def test_a_one_row_product_reads_each_piece_whole():
    """From the whole weight, XLA:CPU's one-row product slices each row's part out of `u8[out, in]`
    codes; from the pieces, no array of whole rows exists in the compiled step."""
    qt = jax.device_put(whole())
    x = jnp.ones((1, IN), jnp.float32)
    whole_rows = re.compile(rf"u8\[(\d+,)?{OUT},{IN}\]")
    fn, args = run_layers(split_in(qt, SPANS), x, in_place=False)
    assert not whole_rows.search(fn.lower(*args).compile().as_text())
    fn, args = run_layers(qt, x, in_place=False)
    assert whole_rows.search(fn.lower(*args).compile().as_text()), "the check would not see whole rows"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout")
@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_an_engine_over_weights_in_pieces_generates_as_over_whole_ones(tmp_path, monkeypatch, loop):
    """A tiny Llama quantized to Q8_0 while loading, its rows made "long" by a lower fusion threshold:
    every layer weight is stored in pieces, and the engine scores and generates as it does over whole
    weights (the same threshold, so the products take the same spans)."""
    from jaxrs import LLM, SamplingParams
    from jaxrs.loading import device_layout
    from pallas_kernels import qmatmul
    from tests.conftest import save_tiny_llama

    path = save_tiny_llama(tmp_path / "tiny")
    monkeypatch.setattr(qmatmul, "CPU_GEMV_FUSION_BYTES", 1024)  # rows of 256 f32 inputs and up split
    prompts = [[1, 5, 9, 200, 17], [3, 3, 120, 44, 250, 8, 91]]
    found = {}
    for split in (True, False):
        monkeypatch.setattr(device_layout, "SPLIT_LONG_ROWS", split)
        llm = LLM(
            str(path), isq="Q8_0", gemm_dtype="float32", layer_loop=loop, kv_cache_mb=4, max_model_len=64
        )
        layers = llm.engine.runner.params["layers"]  # unrolled: a tuple of per-layer trees
        down = (layers[0] if isinstance(layers, tuple) else layers)["mlp"]["down_proj"]["weight"]
        assert isinstance(down, InPieces) == split and down.out_in == (256, 512)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
        found[split] = ([o.outputs[0].token_ids for o in outs], llm.score(prompts, [[7, 8, 9], [10, 11]]))
    assert found[True][0] == found[False][0]
    np.testing.assert_allclose(np.concatenate(found[True][1]), np.concatenate(found[False][1]), atol=1e-4)
