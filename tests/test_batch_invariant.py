"""The batch-invariant products: one row's result is the same bits whatever the number of rows beside it
(and wherever it sits among them), for every packed format the CPU paths treat differently and for a
float weight; and still the product with the dequantized weight."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.engine.runner import step_xla_options
from jaxrs.ops import qmatmul_invariant, qmatmul_xla
from jaxrs.quant import dequantize, quantize
from pallas_kernels.batch_invariant import matmul_invariant, paged_attention_invariant, tile_rows, tree_sum
from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.qmatmul import FEW_ROW_FORMATS

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's products")

ROWS = (1, 2, 3, 4, 9, 33, 65)  # a decode row, the per-row GEMVs, the tiles, the whole product
OUT, IN = 200, 768  # two 80-row tiles and a 40-row tail; `in` a whole number of every format's blocks
# Each format the few-row products run in tiles, and two they leave whole (nibbles, bit planes)
PACKED = sorted(FEW_ROW_FORMATS) + ["Q4_1", "Q6_K"]


@functools.cache
def packed(fmt: str):
    rng = np.random.default_rng(sum(map(ord, fmt)))
    return jax.device_put(quantize(rng.standard_normal((OUT, IN)).astype(np.float32), fmt))


def one_row_at_each_count(product, weight, row: np.ndarray) -> list[np.ndarray]:
    """`row`'s outputs from `product(x, weight)` at each row count of ROWS, where it is the first and the
    last of random rows: one program compiled as the engine's steps are, the weight an argument as there
    (a constant weight would be folded into another form)."""
    others = np.random.default_rng(1).standard_normal((max(ROWS), row.size)).astype(np.float32)
    xs = []
    for rows in ROWS:
        x = others[:rows].copy()
        x[0] = x[-1] = row
        xs.append(jnp.asarray(x))
    step = jax.jit(lambda xs, w: [product(x, w) for x in xs], compiler_options=dict(step_xla_options()))
    return [np.asarray(y)[at] for y in step(xs, weight) for at in (0, -1)]


def bit_equal(found: list[np.ndarray]) -> bool:
    return all(np.array_equal(f, found[0]) for f in found[1:])


@pytest.mark.parametrize("fmt", PACKED)
def test_a_rows_packed_product_is_the_same_at_every_row_count(fmt):
    qt = packed(fmt)
    assert OUT > tile_rows(qt.out_in) and OUT % tile_rows(qt.out_in)  # several tiles, a ragged tail
    row = np.random.default_rng(0).standard_normal(IN).astype(np.float32)
    found = one_row_at_each_count(qmatmul_invariant, qt, row)
    assert bit_equal(found)
    ref = row @ np.asarray(dequantize(qt)).T
    assert np.max(np.abs(found[0] - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_rows_float_product_is_the_same_at_every_row_count(dtype):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((OUT, IN)), dtype)
    row = np.random.default_rng(0).standard_normal(IN).astype(np.float32)
    found = one_row_at_each_count(lambda x, w: matmul_invariant(x, w, jnp.float32), w, row)
    assert bit_equal(found) and found[0].dtype == np.float32
    ref = row @ np.asarray(w, np.float32).T
    assert np.max(np.abs(found[0] - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_the_default_products_are_not():
    """The same check fails on the products the engine runs by default: what the mode is for."""
    qt = packed("U8M")
    row = np.random.default_rng(0).standard_normal(IN).astype(np.float32)
    assert not bit_equal(one_row_at_each_count(qmatmul_xla, qt, row))


def attention_alone_and_beside(attention, q_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A query chunk's attention over its 40-key context, alone (the narrowest table) and as the middle of
    three rows, one of them 700 keys long (a table 64 blocks wide)."""
    rng = np.random.default_rng(q_len)
    block, heads, kv_heads, dim = 16, 6, 2, 32
    k_cache, v_cache = (
        jnp.asarray(rng.standard_normal((1, 64, block, kv_heads, dim)), jnp.float16) for _ in "kv"
    )
    q = jnp.asarray(rng.standard_normal((3, q_len, heads, dim)), jnp.float32)
    rows = [(list(range(50, 60)), 150), (list(range(3)), 40), (list(range(5, 49)), 700)]  # (blocks, keys)

    def call(picked: list[int]) -> np.ndarray:
        tables = np.zeros((len(picked), 8 if len(picked) == 1 else 64), np.int32)
        positions = np.zeros((len(picked), q_len), np.int32)
        for i, r in enumerate(picked):
            blocks, keys = rows[r]
            tables[i, : len(blocks)] = blocks
            positions[i] = np.arange(keys - q_len, keys)
        context = np.array([rows[r][1] for r in picked], np.int32)
        step = jax.jit(
            lambda q, k, v: attention(q, k, v, 0, tables, positions, context, scale=dim**-0.5),
            compiler_options=dict(step_xla_options()),
        )
        return np.asarray(step(q[np.array(picked)], k_cache, v_cache))

    return call([1])[0], call([0, 1, 2])[1]


@pytest.mark.parametrize("q_len", [1, 4], ids=["decode", "chunk"])
def test_a_querys_attention_is_the_same_beside_any_rows(q_len):
    alone, beside = attention_alone_and_beside(paged_attention_invariant, q_len)
    assert np.array_equal(alone, beside)


def test_the_default_attention_is_not():
    """A long row beside a verify's chunk turns the XLA op to its tiled form: other bits."""
    alone, beside = attention_alone_and_beside(paged_attention_xla, 4)
    assert not np.array_equal(alone, beside) and np.allclose(alone, beside, atol=1e-5)


def test_a_rows_sum_is_the_same_beside_any_rows():
    """The norms' sums: XLA's own reduction of a row changes with the rows beside it, the tree's does not."""
    x = np.random.default_rng(3).standard_normal((2, 64, 576)).astype(np.float32)
    step = jax.jit(tree_sum, compiler_options=dict(step_xla_options()))
    assert np.array_equal(np.asarray(step(x[:1, :4]))[0], np.asarray(step(x))[0, :4])
    np.testing.assert_allclose(np.asarray(step(x)), x.sum(-1), rtol=1e-5, atol=1e-5)
    assert float(tree_sum(jnp.ones(5))) == 5.0


def test_leading_axes_dtype_and_bad_shapes():
    qt = packed("Q8F")
    x = jnp.ones((2, 3, IN), jnp.bfloat16)
    y = qmatmul_invariant(x, qt)
    assert y.shape == (2, 3, OUT) and y.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="expects 768"):
        qmatmul_invariant(jnp.ones((2, 5)), qt)
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        matmul_invariant(jnp.ones((2, 4)), jnp.ones((3, 4), jnp.int8))
