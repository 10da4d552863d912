"""The XLA `qmatmul` at a few rows on CPU (a speculative verify, a decode batch): one fused product per
row, or the weight a tile at a time; the same values as the product with the whole dequantized weight,
and no f32 copy of the whole weight in the compiled code."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.ops import qmatmul_xla
from jaxrs.quant import FORMATS, dequantize, quantize
from pallas_kernels import qmatmul

OUT = 44  # with 8-row tiles: five whole tiles and a ragged tail of four rows


def packed(fmt: str, out: int = OUT, in_features: int | None = None):
    in_features = in_features or {"k": 768, "hqq": 576}.get(FORMATS[fmt].family, 544)
    rng = np.random.default_rng(sum(map(ord, fmt)))
    return jax.device_put(quantize(rng.standard_normal((out, in_features)).astype(np.float32), fmt))


def whole(x: jax.Array, qt) -> np.ndarray:
    """The product with the few-row path off (W dequantized whole, one product)."""
    saved, qmatmul.CPU_FEW_ROWS = qmatmul.CPU_FEW_ROWS, 1
    try:
        return np.asarray(jax.jit(lambda x, w: qmatmul_xla(x, w))(x, qt))
    finally:
        qmatmul.CPU_FEW_ROWS = saved


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows at these shapes, so a product spans several tiles and a ragged tail."""
    monkeypatch.setattr(qmatmul, "CPU_TILE_BYTES", 8 * 768 * 4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the few-row path is XLA:CPU's")
@pytest.mark.parametrize("rows", [2, 3, 5, 17])
@pytest.mark.parametrize("fmt", ["F32", "BF16", "U8M", "Q8F", "Q8_0", "Q8_K", "HQQ8", "Q4_1", "Q6_K"])
def test_few_rows_equal_the_whole_product(fmt, rows, small_tiles):
    qt = packed(fmt)
    assert qmatmul.few_row_tile(qt.out_in) == 8 and OUT % 8
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, qt.out_in[1])), jnp.float32)
    ours = np.asarray(jax.jit(lambda x, w: qmatmul_xla(x, w))(x, qt))
    ref = np.asarray(x @ dequantize(qt).T)
    assert ours.shape == (rows, OUT)
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(ours - whole(x, qt))) <= 1e-5 * scale
    assert np.max(np.abs(ours - ref)) <= 1e-5 * scale


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the few-row path is XLA:CPU's")
def test_leading_axes_and_bf16_keep_their_shape_and_dtype(small_tiles):
    qt = packed("U8M")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, qt.out_in[1])), jnp.bfloat16)
    y = qmatmul_xla(x, qt)
    assert y.shape == (2, 3, OUT) and y.dtype == jnp.bfloat16
    ref = x.astype(jnp.float32) @ dequantize(qt, jnp.bfloat16).astype(jnp.float32).T
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def _weight_sized_f32(text: str, out: int, in_features: int) -> list[str]:
    entry = text.split("ENTRY", 1)[1]
    return [line for line in entry.splitlines() if re.search(rf"f32\[{out},{in_features}\]", line)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
@pytest.mark.parametrize("rows", [2, 9])
def test_the_whole_weight_is_never_written_out_in_f32(rows):
    """Taken whole at 2..64 rows, XLA:CPU writes `f32[out, in]` before its GEMM; the few-row path holds
    one tile's f32 rows at most (or none: fused one-row products)."""
    qt = packed("Q8F", out=1024, in_features=1536)
    x = jnp.ones((rows, 1536), jnp.float32)
    ours = jax.jit(lambda x, w: qmatmul_xla(x, w)).lower(x, qt).compile().as_text()
    assert not _weight_sized_f32(ours, 1024, 1536)
    saved, qmatmul.CPU_FEW_ROWS = qmatmul.CPU_FEW_ROWS, 1
    try:
        before = jax.jit(lambda x, w: qmatmul_xla(x, w)).lower(x, qt).compile().as_text()
    finally:
        qmatmul.CPU_FEW_ROWS = saved
    assert _weight_sized_f32(before, 1024, 1536), "the check would not see the whole weight written"


def test_tile_rows_follow_the_row_length():
    most = qmatmul.CPU_TILE_BYTES // (896 * 4) // 8 * 8
    assert qmatmul.few_row_tile((most * 7, 896)) == most
    assert qmatmul.few_row_tile((896, 1 << 20)) == 8  # never fewer than 8 rows
    assert qmatmul.few_row_tile((5, 64)) == 5  # never more than the weight has


def test_tiles_divide_the_rows_where_they_can():
    """A tile a little under the budget that divides `out` leaves no ragged tail (its own product)."""
    most = qmatmul.CPU_TILE_BYTES // (896 * 4) // 8 * 8  # 72 rows of Qwen2.5-0.5B's 896 inputs
    assert qmatmul.few_row_tile((4864, 896)) == 64 == most - 8 and 4864 % 64 == 0
    assert qmatmul.few_row_tile((151936, 896)) == 64  # the vocabulary: 2^7 x 1187
    assert qmatmul.few_row_tile((1187 * 8, 896)) == most  # no divisor near: the budget's tile and a tail


def _dot_widths(text: str, rows: int) -> set[int]:
    """The output widths of the dots in compiled code, for `rows` rows."""
    return {int(w) for w in re.findall(rf"= f32\[{rows},(\d+)\]\S* dot\(", text)}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the few-row path is XLA:CPU's")
def test_a_whole_number_of_tiles_needs_no_tail_product(small_tiles):
    """48 rows in tiles of 8: only the tile's dot; 44 rows: a dot of 4 more for the ragged tail."""
    x = jnp.ones((5, 768), jnp.float32)
    widths = {}
    for out in (48, 44):
        qt = packed("U8M", out=out, in_features=768)
        assert qmatmul.few_row_tile(qt.out_in) == 8
        widths[out] = _dot_widths(jax.jit(lambda x, w: qmatmul_xla(x, w)).lower(x, qt).compile().as_text(), 5)
        ref = np.asarray(x @ dequantize(qt).T)
        np.testing.assert_allclose(np.asarray(qmatmul_xla(x, qt)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert widths == {48: {8}, 44: {8, 4}}


def test_byte_code_formats_only():
    """Formats of nibbles or bit planes dequantize too slowly on XLA:CPU for tiles to pay."""
    assert {"U8M", "Q8F", "Q8_0", "F32"} <= qmatmul.FEW_ROW_FORMATS
    assert not {"Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q2_K", "HQQ4"} & qmatmul.FEW_ROW_FORMATS


def _dot_fusion_parameters(text: str) -> list[list[tuple[int, ...]]]:
    """The parameter shapes of each fused computation in compiled code whose root is a dot."""
    found = []
    for body in re.split(r"\n(?=\S)", text):
        if re.search(r"ROOT \S+ = \S+ dot\(", body):
            shapes = re.findall(r"param_\S*: \w+\[([\d,]*)\]", body.split("\n", 1)[0])
            found.append([tuple(int(d) for d in s.split(",") if d) for s in shapes])
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
@pytest.mark.parametrize("rows", [2, 3])
def test_a_row_from_a_reshape_reaches_its_gemv_in_the_gemvs_shape(rows):
    """x flattened from a [rows, 1, heads, group, dim] producer (the decode attention's output, o_proj's
    input): each row's GEMV reads a row of its own, not x through the reshape, which XLA:CPU would index
    element by element at a tenth of the GEMV's speed. Same values either way."""
    qt = packed("Q8F", out=64, in_features=896)
    heads = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 1, 2, 7, 64)), jnp.float32)

    def step():  # a new function each time: the flag is read while tracing
        return jax.jit(lambda heads, w: qmatmul_xla((heads * 2.0).reshape(rows, 1, 896), w))

    ours = step().lower(heads, qt).compile().as_text()
    assert all((rows, 1, 2, 7, 64) not in shapes for shapes in _dot_fusion_parameters(ours))
    saved, qmatmul.GEMV_ROWS_APART = qmatmul.GEMV_ROWS_APART, False
    try:
        before = step().lower(heads, qt).compile().as_text()
        sliced = np.asarray(step()(heads, qt))
    finally:
        qmatmul.GEMV_ROWS_APART = saved
    assert any((rows, 1, 2, 7, 64) in shapes for shapes in _dot_fusion_parameters(before)), (
        "the check would not see a GEMV reading the reshape"
    )
    np.testing.assert_array_equal(np.asarray(step()(heads, qt)), sliced)


def test_four_rows_are_gemvs_for_layer_sized_weights_only():
    """From 4 rows a product takes the bfloat16 GEMM, except a layer-sized weight at 4 rows (one GEMV a
    row): not a small one, and not an output head (larger; the GEMM takes it in cached slices)."""
    bf16 = jnp.bfloat16
    assert qmatmul.gemv_rows((4864, 896)) == 4 and qmatmul.gemv_rows((896, 2432)) == 4  # Qwen2.5-0.5B
    assert qmatmul.gemv_rows((1536, 576)) == 3 and qmatmul.gemv_rows((2048, 640)) == 3  # demo, Gemma
    assert qmatmul.gemv_rows((151936, 896)) == 3 and qmatmul.gemv_rows((1187, 896)) == 3  # a head, a slice
    assert qmatmul.gemv_rows(None) == qmatmul.CPU_GEMV_ROWS
    cpu = jax.default_backend() == "cpu"
    assert qmatmul.few_row_path(4, "Q8F", bf16, (4864, 896)) is cpu
    assert not qmatmul.few_row_path(4, "Q8F", bf16, (896, 896))
    assert not qmatmul.few_row_path(5, "Q8F", bf16, (4864, 896))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
def test_a_large_weights_four_rows_are_f32_gemvs_with_the_gemms_values(monkeypatch):
    qt = packed("Q8F", out=OUT)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, qt.out_in[1])), jnp.float32)

    def product():  # a new function each time: the thresholds are read while tracing
        return jax.jit(lambda x, w: qmatmul_xla(x, w, gemm_dtype=jnp.bfloat16))

    gemm = product().lower(x, qt).compile().as_text()
    monkeypatch.setattr(qmatmul, "CPU_LARGE_WEIGHT", OUT * qt.out_in[1])  # this weight counts as large
    gemvs = product().lower(x, qt).compile().as_text()
    assert "bf16[4," in gemm and "bf16[4," not in gemvs  # the GEMM's bfloat16 operand is gone
    assert len(re.findall(rf"= f32\[{OUT}\]\S* dot\(", gemvs)) == 4  # one GEMV a row
    ref = np.asarray(x @ dequantize(qt).T)
    np.testing.assert_allclose(np.asarray(product()(x, qt)), ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))
