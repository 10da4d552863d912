"""A layer of stacked packed weights left in its stack inside the layer loop: the same products as the
layer's own slice, any other reader sees the slice, and XLA:CPU copies no layer out of the stack
before the few-row tile loop reads it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.ops import qmatmul_xla
from jaxrs.quant import dequantize, quantize, stack
from jaxrs.quant.stacked_layer import StackedLayer, scan_packed_in_place
from pallas_kernels import qmatmul

LAYERS, OUT, IN = 3, 64, 64


def stacked(fmt: str = "U8M"):
    rng = np.random.default_rng(7)
    layers = [quantize(rng.standard_normal((OUT, IN)).astype(np.float32), fmt) for _ in range(LAYERS)]
    return jax.device_put(stack(layers))


def run_layers(tree, x, in_place: bool):
    """`h <- h + 0.1 * h @ W_l.T` over the layers under `lax.scan`, the packed weight kept in its stack
    (`scan_packed_in_place`) or sliced by the scan as before."""

    def loop(x, tree):
        if in_place:
            scanned, layer_of = scan_packed_in_place(tree)
        else:
            scanned, layer_of = tree, None

        def body(h, xs):
            part, index = xs
            layer = layer_of(part, index) if layer_of else part
            return h + 0.1 * qmatmul_xla(h, layer["w"]) * layer["gain"][:, None], None

        return jax.lax.scan(body, x, (scanned, jnp.arange(LAYERS, dtype=jnp.int32)))[0]

    return jax.jit(loop), (x, tree)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows: the products loop over tiles (the case XLA copied the layer for)."""
    monkeypatch.setattr(qmatmul, "CPU_TILE_BYTES", 8 * IN * 4)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("fmt", ["U8M", "Q8F", "Q4_1"])
def test_in_place_layers_give_the_sliced_layers_products(fmt, rows, small_tiles):
    tree = {"w": stacked(fmt), "gain": jnp.arange(1.0, 1.0 + LAYERS * rows).reshape(LAYERS, rows)}
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, IN)), jnp.float32)
    fn, args = run_layers(tree, x, in_place=True)
    ours = np.asarray(fn(*args))
    fn, args = run_layers(tree, x, in_place=False)
    np.testing.assert_allclose(ours, np.asarray(fn(*args)), rtol=0, atol=1e-5 * np.abs(ours).max())


def test_a_stacked_layer_reads_as_its_slice():
    qt = stacked()
    view = StackedLayer(qt, jnp.int32(1))
    assert view.shape == (OUT, IN) and view.lead_shape == () and view.fmt == qt.fmt
    np.testing.assert_array_equal(np.asarray(dequantize(view)), np.asarray(dequantize(qt[1])))
    leaves, treedef = jax.tree.flatten(view)
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, StackedLayer) and int(again.layer) == 1 and again.stack.shape == qt.shape
    with pytest.raises(ValueError, match="one leading"):
        StackedLayer(qt[0], jnp.int32(0))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
def test_no_layer_is_copied_out_of_the_stack(small_tiles):
    """Sliced by the scan, each layer's `u8[out, in]` codes are written out before the tile loop; in
    place, the loop reads its tiles from the `u8[layers, out, in]` stack and no layer-sized array exists."""
    tree = {"w": stacked(), "gain": jnp.ones((LAYERS, 9))}
    x = jnp.ones((9, IN), jnp.float32)
    layer_sized = re.compile(rf"u8\[{OUT},{IN}\]")
    fn, args = run_layers(tree, x, in_place=True)
    assert not layer_sized.search(fn.lower(*args).compile().as_text())
    fn, args = run_layers(tree, x, in_place=False)
    assert layer_sized.search(fn.lower(*args).compile().as_text()), "the check would not see the copy"


def test_only_the_weights_picked_stay_in_their_stacks():
    """The decoder keeps in place only the weights whose product takes the few-row tiles at its rows."""
    tree = {"a": stacked("U8M"), "b": stacked("Q4_1"), "gain": jnp.ones((LAYERS, 2))}
    scanned, layer_of = scan_packed_in_place(tree, keep=lambda qt: qt.fmt == "U8M")
    sliced = jax.tree.map(lambda a: a[2], scanned)  # what the scan hands layer 2
    layer = layer_of(sliced, jnp.int32(2))
    assert isinstance(layer["a"], StackedLayer) and type(layer["b"]) is not StackedLayer
    for name in ("a", "b"):
        want = np.asarray(dequantize(tree[name][2]))
        np.testing.assert_array_equal(np.asarray(dequantize(layer[name])), want)
