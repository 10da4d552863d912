"""Matmul against packed quantized weights: `x [..., in] @ W.T -> [..., out]`, W `[out, in]` packed.

W comes as the arrays of its format's layout (`formats`: field name -> `[out, in // per]`) with the
format name and the logical `(out, in)` as static keyword arguments; `jaxrs.ops` adapts the engine's
`QuantizedTensor` to that.

`qmatmul_xla` dequantizes and lets XLA fuse the dequantization into the dot (the reference and the
default off GPU). `qmatmul_pallas` never materializes W: each program owns a tile of output rows x
columns and walks `in`, loading tiles of the packed arrays and dequantizing them in registers right
before the dot (GPU Triton lowering; interpret mode on CPU).

Planes. A packed byte holds several elements that are far apart in `in` (Q4_0's byte j holds
elements j and j + 16 of its block; Q2_K's holds four, 32 apart). Rather than shuffle the unpacked
values back into order inside the kernel, the wrapper permutes the activations once (cheap: x is
small next to W) into planes: plane p, column c is the element held by bits p of packed column c.
The kernel then dequantizes plane p of a packed tile with shifts and masks only and accumulates one
dot per plane. Scales (and Q5/Q3_K/Q6_K high bits) are gathered per element from their arrays at
`element >> log2(group)`: tiny arrays, cached.

Families: legacy 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, U8M, Q8F), K-quant 256-superblocks
(Q2_K..Q6_K, Q8_K) and HQQ (HQQ4, HQQ8) differ only in the plane map and the per-tile dequantization
below; F32/F16/BF16 take the same path with one plane.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dequant import dequantize_packed
from pallas_kernels.formats import LAYOUTS
from pallas_kernels.occupancy import auto_splits, even_splits
from pallas_kernels.shapes import MIN_DOT_DIM, next_power_of_2

# `jax.experimental.pallas.triton` (GPU compiler parameters, masked loads) is imported by the functions
# that use it: its MLIR dialects cost every process about 5 MiB of resident memory, GPU or not.

# XLA:CPU fuses a weight's producer (a packed weight's dequantization, a `lax.scan` layer's slice) into a
# one-row product only while the row is under this many bytes (`kFusionThresholdBytes` in XLA's
# cpu_instruction_fusion.cc); past it, it writes the whole weight out transposed in f32 and then reads
# it back (Qwen2.5-0.5B's `down_proj`, 4,864 inputs: most of a decode step).
CPU_GEMV_FUSION_BYTES = 16 * 1024


def gemv_spans(in_features: int, block: int, itemsize: int = 4) -> list[tuple[int, int]]:
    """`[(start, end)]` along `in` for a one-row product on XLA:CPU with rows of `in_features` elements of
    `itemsize` bytes: one span while the row is under CPU_GEMV_FUSION_BYTES (XLA:CPU then fuses the
    weight's producer into the product), else the fewest spans of whole `block`s each under it (one block
    each if even one is not)."""
    row_bytes = in_features * itemsize
    if row_bytes < CPU_GEMV_FUSION_BYTES:
        return [(0, in_features)]
    pieces = -(-row_bytes // CPU_GEMV_FUSION_BYTES)
    while True:
        size = -(-in_features // pieces // block) * block  # whole blocks
        if size * itemsize < CPU_GEMV_FUSION_BYTES or size == block:
            return [(a, min(a + size, in_features)) for a in range(0, in_features, size)]
        pieces += 1


def _input_spans(x: jax.Array, in_features: int, block: int) -> list[tuple[int, int]]:
    """`gemv_spans` for a one-row product on CPU; one span for anything else."""
    if math.prod(x.shape[:-1]) != 1 or jax.default_backend() != "cpu":
        return [(0, in_features)]
    return gemv_spans(in_features, block, x.dtype.itemsize)


def _product_t(
    x: jax.Array, weight: Callable[[int, int], jax.Array], in_features: int, block: int, out_dtype
) -> jax.Array:
    """`x @ W.T` with W's columns `a:b` given by `weight(a, b)`, in pieces along `in` where XLA:CPU needs
    them to fuse W into the product (`_input_spans`), summed by `sum_of_parts`."""
    spans = _input_spans(x, in_features, block)
    parts = [_dot_t(x if len(spans) == 1 else x[..., a:b], weight(a, b).astype(x.dtype)) for a, b in spans]
    y = parts[0] if len(parts) == 1 else sum_of_parts(parts)
    return y.astype(out_dtype or x.dtype)


def sum_of_parts(parts: list[jax.Array]) -> jax.Array:
    """The f32 sum of a product's parts along `in` (`_product_t`'s, or a weight held in pieces'). They pass
    an optimization barrier first: XLA:CPU would otherwise fuse a one-row product into the add that takes
    it, which keeps W's dequantization out of that product."""
    parts = lax.optimization_barrier([p.astype(jnp.float32) for p in parts])
    return sum(parts[1:], parts[0])


# A product of more than CPU_GEMV_ROWS rows contracts W's last axis in the dot itself: written as
# `matmul(x, W.T)`, XLA:CPU met a transposed bfloat16 operand, upcast the dot to f32 and only then folded
# the transpose, so such a GEMM (the head's slices, ...) ran in f32 whatever `gemm_dtype` said
# (bench/RESULTS.md, "GEMMs that stayed f32"). One to CPU_GEMV_ROWS rows keep `matmul`, the form XLA:CPU
# compiles into one fused GEMV loop (as a dot_general it becomes a multiply and a reduce).
GEMM_CONTRACTS_LAST_AXIS = True


def _dot_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in] @ w.T` (w `[out, in]`) with f32 accumulation."""
    rows = math.prod(x.shape[:-1])
    if GEMM_CONTRACTS_LAST_AXIS and w.ndim == 2 and rows > CPU_GEMV_ROWS:
        return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.matmul(x, w.T, preferred_element_type=jnp.float32)


def matmul_t(
    x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None, *, gemm_dtype: jnp.dtype | None = None
) -> jax.Array:
    """`x [..., in] @ w.T` (w `[out, in]`, cast to x's dtype) with f32 accumulation, in `out_dtype`
    (default x's). A product of CPU_GEMM_ROWS rows or more takes both operands in `gemm_dtype` when
    that is given (`gemm_operands`).

    Written as `matmul`, not `einsum`: on XLA:CPU a one-row product (a batch-1 decode step) then
    compiles to one fused GEMV loop that converts (or dequantizes) each weight as it reads it, and
    reads a `lax.scan` layer's slice in place instead of copying it first. `bench/bench_cpu_matmul.py`
    (30 SmolLM2 layers, one row): f32 35.4 -> 25.7 ms, Q8_0 23.4 -> 16.4 ms against the einsum
    (bench/RESULTS.md, "CPU decode, second round"). Rows of 4,096 f32 inputs or more are split
    (`_input_spans`) so that the fusion still happens.
    """
    in_features = w.shape[-1]
    whole = (0, in_features)
    x, out_dtype = gemm_operands(x, gemm_dtype, out_dtype)
    return _product_t(x, lambda a, b: w if (a, b) == whole else w[..., a:b], in_features, 1, out_dtype)


def gemm_operands(
    x: jax.Array, gemm_dtype: jnp.dtype | None, out_dtype: jnp.dtype | None = None
) -> tuple[jax.Array, jnp.dtype]:
    """x as a product takes it, and the product's output dtype (`out_dtype`, default x's own): cast to
    `gemm_dtype` when that is given and the product has CPU_GEMM_ROWS rows or more (a prompt chunk, a
    decode batch, a speculative verify: GEMMs bound by their multiply-adds; bfloat16 on a CPU with bf16
    dot instructions, where XLA:CPU runs them about twice as fast as in f32). Products of one to
    CPU_GEMV_ROWS rows keep x's dtype: each row is a fused GEMV reading W once, which bfloat16 does not
    speed up."""
    out_dtype = out_dtype or x.dtype
    if not gemm_rows(math.prod(x.shape[:-1]), gemm_dtype):
        return x, out_dtype
    return x.astype(gemm_dtype), out_dtype


def gemm_rows(rows: int, gemm_dtype: jnp.dtype | None, out_in: tuple[int, int] | None = None) -> bool:
    """Whether a product of `rows` rows (with an `out_in` weight, where known) takes its operands in
    `gemm_dtype` (given) as one GEMM: from CPU_GEMM_ROWS rows up, where XLA:CPU's bfloat16 GEMM beats both
    the few-row tiles and f32, past the rows a large weight takes as GEMVs (`gemv_rows`)."""
    return gemm_dtype is not None and rows >= CPU_GEMM_ROWS and rows > gemv_rows(out_in)


def qmatmul_xla(
    x: jax.Array,
    arrays: Mapping[str, jax.Array],
    *,
    fmt: str,
    out_in: tuple[int, int],
    layer: jax.Array | None = None,
    gemm_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """`x @ W.T` for the `[out, in]` weight W that `arrays`, the fields of `fmt`'s layout, pack: W is
    dequantized in f32, cast to x's dtype, dotted with f32 accumulation; XLA fuses the dequantization
    into the dot (a long one-row product in pieces of whole blocks, `matmul_t`). A few rows on CPU go a
    tile of W at a time (`_few_row_product`), unless `gemm_dtype` is given: then a product of
    CPU_GEMM_ROWS rows or more takes x and W in that dtype as one GEMM (`gemm_operands`); the result is
    in x's dtype.

    `layer`: the arrays hold stacked layers `[L, out, in // per]` and W is layer `layer` (a traced
    index, inside the layer loop). The few-row tiles then read W's rows straight out of the stack: a
    loop over tiles that took the layer's slice as its operand would make XLA copy the slice out first."""
    if few_row_path(math.prod(x.shape[:-1]), fmt, gemm_dtype, out_in):
        _check(x, _layer_shapes(arrays, layer), fmt, out_in)
        return _few_row_product(x, arrays, fmt, out_in, layer)
    if layer is not None:
        arrays = {n: lax.dynamic_index_in_dim(v, layer, keepdims=False) for n, v in arrays.items()}
    _check(x, arrays, fmt, out_in)
    x, out_dtype = gemm_operands(x, gemm_dtype)
    return _packed_product(x, arrays, fmt, out_in, out_dtype)


def _layer_shapes(arrays: Mapping[str, jax.Array], layer: jax.Array | None) -> Mapping[str, object]:
    """The fields' shapes and dtypes as one layer has them (for `_check`)."""
    if layer is None:
        return arrays
    return {n: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for n, v in arrays.items()}


def _one_layer(arrays: Mapping[str, jax.Array], layer: jax.Array | None, start, size: int | None) -> dict:
    """W's rows `start .. start + size` (all from `start` when `size` is None; `start` may be traced),
    each field `[rows, in // per]`, read out of layer `layer` of stacked arrays when there is one."""
    if layer is None and size is None and isinstance(start, int) and start == 0:
        return dict(arrays)
    out = {}
    for n, v in arrays.items():
        v, at = (v[None], 0) if layer is None else (v, layer)
        rows = v.shape[1] - start if size is None else size
        out[n] = lax.dynamic_slice(v, (at, start, 0), (1, rows, v.shape[2]))[0]
    return out


def _packed_product(
    x: jax.Array,
    arrays: Mapping[str, jax.Array],
    fmt: str,
    out_in: tuple[int, int],
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """`x @ W.T` in one product (split along `in` where a one-row product needs it, `_product_t`), in
    `out_dtype` (default x's)."""
    layout = LAYOUTS[fmt]

    def weight(a: int, b: int) -> jax.Array:
        arrays_ab = arrays if (a, b) == (0, out_in[1]) else layout.columns(arrays, a, b)
        return dequantize_packed(arrays_ab, fmt=fmt, out_in=(out_in[0], b - a), dtype=x.dtype)

    return _product_t(x, weight, out_in[1], layout.block, out_dtype)


# A product of 2..CPU_FEW_ROWS rows with a packed weight on XLA:CPU (a speculative verify of K + 1
# positions, a decode batch): XLA fuses the dequantization into a product only at one row, so taken whole
# it writes all of W out in f32 and reads it back for a GEMM, several times one row's cost. Instead:
# up to CPU_GEMV_ROWS rows, one fused one-row product per row (W read once per row, from cache after the
# first); past that, W a tile of CPU_TILE_BYTES (f32) at a time under `lax.map`, each tile dequantized
# once into cache and multiplied with all rows. Only for formats with one code per byte (or a float): the
# nibble and bit-plane formats (Q4_0, Q4_1, Q4_K, Q6_K, ...) dequantize so slowly on XLA:CPU that tiles
# or repeated one-row products cost 2-5x the whole product there. Thresholds and formats from
# bench/bench_cpu_matmul.py --few-rows (bench/RESULTS.md, "Few-row products on XLA:CPU"). The tile size
# measured again in the engine's step at 4, 9 and 32 rows on three models (bench/RESULTS.md, "Few-row
# products, third round", a shared machine): 256 KiB matched or beat 128 KiB and 512 KiB to 4 MiB at
# every row count once no layer is copied out of its stack (`qmatmul_xla`'s `layer`).
CPU_FEW_ROWS = 64
CPU_GEMV_ROWS = 3
# With bfloat16 GEMM operands (`gemm_dtype`, a CPU with bfloat16 dots) a product of this many rows or more
# is one GEMM instead: W dequantized whole in bfloat16 and multiplied on both cores, 1.5-2.1x the tiles'
# speed at 4-32 rows on the demo, Gemma-3-270M and Qwen2.5-0.5B (the tile loop runs one small dot at a
# time, on one core); two rows measured even (bench/RESULTS.md, "Decode batches in bfloat16").
CPU_GEMM_ROWS = CPU_GEMV_ROWS + 1
CPU_TILE_BYTES = 256 * 1024
CPU_TILE_SLACK = 0.25  # how far under CPU_TILE_BYTES a tile may go to divide `out`
FEW_ROW_FORMATS = frozenset(("F32", "F16", "BF16", "Q8_0", "Q8F", "U8M", "Q8_K", "HQQ8"))


def few_row_path(
    rows: int, fmt: str, gemm_dtype: jnp.dtype | None = None, out_in: tuple[int, int] | None = None
) -> bool:
    """Whether `qmatmul_xla` (with `gemm_dtype`) takes a product of `rows` rows with a `fmt` (`out_in`)
    weight a row or a tile of W at a time (never writing all of W out in f32)."""
    return (
        jax.default_backend() == "cpu"
        and 1 < rows <= CPU_FEW_ROWS
        and fmt in FEW_ROW_FORMATS
        and not gemm_rows(rows, gemm_dtype, out_in)
    )


# A layer-sized weight of CPU_LARGE_WEIGHT entries or more (up to CPU_LARGE_WEIGHT_MAX) takes
# CPU_LARGE_GEMV_ROWS rows as one GEMV a row too, where others take the bfloat16 GEMM from CPU_GEMM_ROWS.
# At 4 rows the GEMM dequantizes such a W whole into bfloat16 (past the caches) and YNNPACK packs it again,
# more than three more reads of W cost (Qwen2.5-0.5B's 4,864 x 896 gate: 1,310 + 790 us a layer against
# 4 x 180); on small weights the GEMVs' fixed costs (four products and four row selections an input, each
# GEMV split over both cores) lose (the demo's 4-row step 0.91x with every product as GEMVs); an output
# head is larger still, and the GEMM takes it in 8 MiB slices that stay in cache (Gemma-3-270M's 4-row step
# 0.92x with its head as GEMVs). bench/RESULTS.md, "A few-row GEMV reading a reshaped row".
CPU_LARGE_WEIGHT = 2**21 + 1  # past a head slice's 8 MiB of f32
CPU_LARGE_WEIGHT_MAX = 2**24
CPU_LARGE_GEMV_ROWS = 4


def gemv_rows(out_in: tuple[int, int] | None = None) -> int:
    """The most rows a few-row product with an `out_in` weight takes as one GEMV a row."""
    if out_in is not None and CPU_LARGE_WEIGHT <= math.prod(out_in) <= CPU_LARGE_WEIGHT_MAX:
        return max(CPU_GEMV_ROWS, CPU_LARGE_GEMV_ROWS)
    return CPU_GEMV_ROWS


def few_row_tile(out_in: tuple[int, int], itemsize: int = 4) -> int:
    """Rows of W per tile of a few-row product: the most whose dequantized form fits CPU_TILE_BYTES (a
    multiple of 8, at least 8, at most `out`); a divisor of `out` at most CPU_TILE_SLACK below that when
    there is one, so that no ragged tail needs a product of its own."""
    out_features, in_features = out_in
    most = max(8, CPU_TILE_BYTES // (in_features * itemsize) // 8 * 8)
    if most >= out_features:
        return out_features
    for tile in range(most, math.ceil(most * (1 - CPU_TILE_SLACK)) - 1, -8):
        if out_features % tile == 0:
            return tile
    return most


def _few_row_product(
    x: jax.Array,
    arrays: Mapping[str, jax.Array],
    fmt: str,
    out_in: tuple[int, int],
    layer: jax.Array | None = None,
) -> jax.Array:
    """`x @ W.T` for a few rows on CPU: a fused one-row product per row, or W tile by tile (above);
    W is layer `layer` of stacked arrays when that is given (`qmatmul_xla`)."""
    out_features, in_features = out_in
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] <= gemv_rows(out_in):
        w = _one_layer(arrays, layer, 0, None)
        parts = [_packed_product(_row_apart(x2, r), w, fmt, out_in) for r in range(x2.shape[0])]
        return jnp.concatenate(lax.optimization_barrier(parts)).reshape(*lead, out_features)

    tile = few_row_tile(out_in, x.dtype.itemsize)
    count, rest = divmod(out_features, tile)

    def tile_at(i: jax.Array) -> jax.Array:  # W's rows i * tile .. (i + 1) * tile, read in place
        return _packed_product(x2, _one_layer(arrays, layer, i * tile, tile), fmt, (tile, in_features))

    if count == 1:
        y = tile_at(jnp.int32(0))
    else:
        y = lax.map(tile_at, jnp.arange(count, dtype=jnp.int32))  # [count, rows, tile]
        y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], count * tile)
    if rest:
        tail = _one_layer(arrays, layer, count * tile, rest)
        y = jnp.concatenate([y, _packed_product(x2, tail, fmt, (rest, in_features))], axis=-1)
    return y.reshape(*lead, out_features)


# Each row of a few-row product computed apart from the GEMV that reads it. A row sliced out of x is fused
# into the GEMV with x's producer; when that producer has another shape (the decode attention's output,
# [rows, 1, kv_heads, group, head_dim], flattened for o_proj), the GEMV reads x through that reshape,
# index by index, at a tenth of its speed (Qwen2.5-0.5B two-row step: o_proj 520 against 44 us a layer
# at one row; bench/RESULTS.md, "A few-row GEMV reading a reshaped row"). A select-and-sum over the rows
# is not fused into the GEMV: the row is written once, in the GEMV's own shape.
GEMV_ROWS_APART = True


def _row_apart(x2: jax.Array, r: int) -> jax.Array:
    """Row `r` of `x2` `[rows, in]` as `[1, in]`, the same values (a select of it and a sum with zeros)."""
    if not GEMV_ROWS_APART:
        return x2[r : r + 1]
    picked = (jnp.arange(x2.shape[0]) == r)[:, None]
    return jnp.where(picked, x2, jnp.zeros((), x2.dtype)).sum(0, keepdims=True, dtype=x2.dtype)


def _check(x: jax.Array, arrays: Mapping[str, jax.Array], fmt: str, out_in: tuple[int, int]) -> None:
    weight = f"the {fmt} weight of shape {tuple(out_in)}"
    if lead := LAYOUTS[fmt].lead_shape(arrays):
        raise ValueError(f"qmatmul takes one [out, in] weight; index the stacked axes {lead} of {weight}")
    if x.shape[-1] != out_in[1]:
        raise ValueError(f"x has {x.shape[-1]} features, {weight} expects {out_in[1]}")


# --------------------------------------------------------------------------------------------------------
# Plane maps: (plane p, packed column c) -> element index along `in`. Written with shifts and masks so
# the same function runs on NumPy ints (building the activation permutation) and on int32 tiles (inside
# the kernel).
# --------------------------------------------------------------------------------------------------------


def _nibble_halves(unit: int) -> Callable:
    half = unit // 2  # bytes per unit; byte l holds elements l (low nibble) and l + half (high)
    shift = half.bit_length() - 1
    return lambda c, p: ((c >> shift) * unit) + p * half + (c & (half - 1))


def _crumbs(c, p):  # Q2_K/Q3_K: per 128 elements, byte l bits 2p = element 32p + l
    return ((c >> 5) << 7) + (p << 5) + (c & 31)


def _q6k_low(c, p):  # Q6_K ql: per 256, byte 64n + 32k + l low nibble = 128n + 32k + l, high +64
    return ((c >> 6) << 7) + (p << 6) + (c & 63)


def _identity(c, p):
    return c


# planes per packed column, the plane map, and the array holding the per-plane codes
_PLANES: dict[str, tuple[int, Callable, str]] = {
    "F32": (1, _identity, "w"),
    "F16": (1, _identity, "w"),
    "BF16": (1, _identity, "w"),
    "Q4_0": (2, _nibble_halves(32), "qs"),
    "Q4_1": (2, _nibble_halves(32), "qs"),
    "Q5_0": (2, _nibble_halves(32), "qs"),
    "Q5_1": (2, _nibble_halves(32), "qs"),
    "Q8_0": (1, _identity, "qs"),
    "U8M": (1, _identity, "qs"),
    "Q8F": (1, _identity, "qs"),
    "Q2_K": (4, _crumbs, "qs"),
    "Q3_K": (4, _crumbs, "qs"),
    "Q4_K": (2, _nibble_halves(64), "qs"),
    "Q5_K": (2, _nibble_halves(64), "qs"),
    "Q6_K": (2, _q6k_low, "ql"),
    "Q8_K": (1, _identity, "qs"),
    "HQQ4": (2, _nibble_halves(64), "qs"),
    "HQQ8": (1, _identity, "qs"),
}


def plane_permutation(fmt: str, in_features: int) -> np.ndarray:
    """`[planes, in / planes]`: the element index of each (plane, packed column)."""
    planes, element_of, _ = _PLANES[fmt]
    cols = np.arange(in_features // planes)
    perm = np.stack([element_of(cols, p) for p in range(planes)])
    assert sorted(perm.reshape(-1).tolist()) == list(range(in_features))
    return perm


# --------------------------------------------------------------------------------------------------------
# Per-tile dequantization. `main` is the tile of the code array, `gather(name, index)` loads array
# `name` at the tile's rows and the given per-column index `[1, C]`; `elem` is the `[1, C]` element
# index of the plane's columns. Returns the f32 weights `[N, C]` of plane p.
# --------------------------------------------------------------------------------------------------------


def _bits_at(gather, name: str, elem, layout: str):
    """The high bit(s) of each element: Q5_0/Q5_1 (u32 per block), Q3_K/Q5_K bit planes, Q6_K crumbs."""
    if layout == "u32":
        return (gather(name, elem >> 5) >> (elem & 31).astype(jnp.uint32)) & 1
    if layout == "bitplane":  # per 256: byte 32 * superblock + l, bit (elem >> 5) & 7
        byte = ((elem >> 8) << 5) + (elem & 31)
        return (gather(name, byte) >> ((elem >> 5) & 7).astype(jnp.uint8)) & 1
    byte = ((elem >> 7) << 5) + (elem & 31)  # crumbs, per 128: bits 2 * ((elem >> 5) & 3)
    return (gather(name, byte) >> (((elem >> 5) & 3) << 1).astype(jnp.uint8)) & 3


def _legacy_tile(fmt: str, main, p: int, elem, gather):
    f32 = jnp.float32
    d = gather("d", elem >> 5).astype(f32)
    if fmt in ("Q8_0", "Q8F"):
        return main.astype(f32) * d
    if fmt == "U8M":
        return main.astype(f32) * d + gather("m", elem >> 5).astype(f32)
    q = (main >> (4 * p)) & 0xF
    if fmt in ("Q5_0", "Q5_1"):
        q = q | (_bits_at(gather, "qh", elem, "u32").astype(jnp.uint8) << 4)
    if fmt == "Q4_0":
        return (q.astype(f32) - 8) * d
    if fmt == "Q5_0":
        return (q.astype(f32) - 16) * d
    return q.astype(f32) * d + gather("m", elem >> 5).astype(f32)


def _kquant_tile(fmt: str, main, p: int, elem, gather):
    f32 = jnp.float32
    d = gather("d", elem >> 8).astype(f32)
    if fmt == "Q8_K":
        return main.astype(f32) * d
    if fmt in ("Q2_K", "Q3_K"):
        q = ((main >> (2 * p)) & 3).astype(f32)
        sc = gather("sc", elem >> 4)
        if fmt == "Q2_K":
            dmin = gather("dmin", elem >> 8).astype(f32)
            return d * (sc & 0xF).astype(f32) * q - dmin * (sc >> 4).astype(f32)
        high = _bits_at(gather, "hmask", elem, "bitplane").astype(f32)
        return d * sc.astype(f32) * (q - 4 * (1 - high))
    q = (main >> (4 * p)) & 0xF
    if fmt == "Q6_K":
        q = q | (_bits_at(gather, "qh", elem, "crumbs") << 4)
        return d * gather("sc", elem >> 4).astype(f32) * (q.astype(f32) - 32)
    if fmt == "Q5_K":
        q = q | (_bits_at(gather, "qh", elem, "bitplane") << 4)
    dmin = gather("dmin", elem >> 8).astype(f32)
    sub = elem >> 5
    return d * gather("sc", sub).astype(f32) * q.astype(f32) - dmin * gather("m", sub).astype(f32)


def _hqq_tile(fmt: str, main, p: int, elem, gather):
    f32 = jnp.float32
    q = main if fmt == "HQQ8" else (main >> (4 * p)) & 0xF
    group = elem >> 6
    return (q.astype(f32) - gather("zero", group).astype(f32)) * gather("scale", group).astype(f32)


def _float_tile(fmt: str, main, p: int, elem, gather):
    return main.astype(jnp.float32)


_FAMILY_TILE = {"legacy": _legacy_tile, "k": _kquant_tile, "hqq": _hqq_tile, "float": _float_tile}


# --------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------


def _qmatmul_kernel(
    x_ref,  # [P, Mp, Cp] activation planes, zero-padded
    *refs,  # the packed arrays of the weight in `names` order (whole, unpadded), then the output
    fmt: str,
    family: str,
    names: tuple[str, ...],
    main_name: str,
    out_features: int,
    columns: int,
    block_m: int,
    block_n: int,
    block_c: int,
    steps_per_split: int,
):
    """One program: output rows [block_m] x columns [block_n] of one split of the packed columns (grid
    axis 2), written as that split's f32 partial sum."""
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    *w_refs, o_ref = refs
    arrays = dict(zip(names, w_refs, strict=True))
    planes, element_of, _ = _PLANES[fmt]
    tile = _FAMILY_TILE[family]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    rows = n0 + jnp.arange(block_n, dtype=jnp.int32)
    rows_in = rows < out_features
    rows_c = jnp.minimum(rows, out_features - 1)[:, None]  # gathers stay in bounds; extra rows dropped
    main_ref = arrays[main_name]
    compute = x_ref.dtype
    precision = lax.Precision.HIGHEST if compute == jnp.float32 else None

    def gather(name, index):
        ref = arrays[name]
        return ref[rows_c, jnp.minimum(index, ref.shape[1] - 1)]

    def step(k, acc):
        c0 = k * block_c
        cols = c0 + jnp.arange(block_c, dtype=jnp.int32)
        mask = rows_in[:, None] & (cols < columns)[None, :]
        main = plgpu.load(main_ref.at[pl.ds(n0, block_n), pl.ds(c0, block_c)], mask=mask, other=0)
        for p in range(planes):
            elem = element_of(cols, p)[None, :]
            w = tile(fmt, main, p, elem, gather).astype(compute)  # [N, C]
            xp = x_ref[p, pl.ds(m0, block_m), pl.ds(c0, block_c)]  # [M, C]
            acc += lax.dot_general(
                xp, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )
        return acc

    split = pl.program_id(2)
    first = split * steps_per_split
    last = jnp.minimum(first + steps_per_split, x_ref.shape[2] // block_c)
    acc = lax.fori_loop(first, last, step, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[split, pl.ds(m0, block_m), pl.ds(n0, block_n)] = acc


def qmatmul_pallas(
    x: jax.Array,
    arrays: Mapping[str, jax.Array],
    *,
    fmt: str,
    out_in: tuple[int, int],
    interpret: bool | None = None,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 256,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Pallas `x @ W.T` reading W packed, with the semantics of `qmatmul_xla` (f32 accumulation,
    result in x's dtype). Grid (row blocks of x, blocks of `out`); each program loops over `in` in
    steps of `block_k` elements (`block_k / planes` packed columns).

    Tuning: `block_m` rows of x per program (shrunk to the padded row count, >= 16), `block_n` output
    features, `block_k` input features per step (powers of two); `split_k` splits the steps over that
    many programs (grid axis 2; their f32 partial sums are added outside), None: as many as fill a GPU
    when the grid is small (`occupancy.auto_splits`, a batch-1 decode), none when interpreted;
    `num_warps`, `num_stages` for Triton. `interpret=None` interprets on CPU and compiles (Triton)
    elsewhere.

    Only activations are padded (rows to `block_m`, planes to whole steps); the packed arrays are
    read in place, with masked loads at the edges, so `out` and `in` need not divide the tiles.
    """
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    _check(x, arrays, fmt, out_in)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    layout = LAYOUTS[fmt]
    out_features, in_features = out_in
    planes, _, main_name = _PLANES[fmt]
    columns = in_features // planes
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    compute = x.dtype

    block_m = min(next_power_of_2(block_m, MIN_DOT_DIM), next_power_of_2(m, MIN_DOT_DIM))
    block_n = min(next_power_of_2(block_n, MIN_DOT_DIM), next_power_of_2(out_features, MIN_DOT_DIM))
    block_c = min(next_power_of_2(block_k // planes, MIN_DOT_DIM), next_power_of_2(columns, MIN_DOT_DIM))
    padded_m = pl.cdiv(m, block_m) * block_m
    padded_c = pl.cdiv(columns, block_c) * block_c
    grid_n = pl.cdiv(out_features, block_n)
    steps = padded_c // block_c
    if split_k is None:
        split_k = 1 if interpret else auto_splits(padded_m // block_m * grid_n, steps)
    split_k, steps_per_split = even_splits(split_k, steps)

    perm = plane_permutation(fmt, in_features)
    x_planes = jnp.transpose(x2[:, perm], (1, 0, 2))  # [P, M, C]
    x_planes = jnp.pad(x_planes, ((0, 0), (0, padded_m - m), (0, padded_c - columns)))

    names = layout.field_names
    packed = [jnp.asarray(arrays[n]) for n in names]
    packed = [a.reshape(a.shape[-2], -1) for a in packed]
    kernel = functools.partial(
        _qmatmul_kernel,
        fmt=fmt,
        family=layout.family,
        names=names,
        main_name=main_name,
        out_features=out_features,
        columns=columns,
        block_m=block_m,
        block_n=block_n,
        block_c=block_c,
        steps_per_split=steps_per_split,
    )
    partials = pl.pallas_call(
        kernel,
        grid=(padded_m // block_m, grid_n, split_k),
        out_shape=jax.ShapeDtypeStruct((split_k, padded_m, grid_n * block_n), jnp.float32),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"qmatmul_{fmt.lower()}_m{block_m}_n{block_n}_c{block_c}_s{split_k}",
    )(x_planes.astype(compute), *packed)
    out = jnp.sum(partials[:, :m, :out_features], axis=0)
    return out.astype(compute).reshape(*lead, out_features)
