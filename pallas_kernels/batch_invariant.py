"""Products and attention whose every row comes out the same bits whatever else shares the call.

Why: on XLA:CPU a product takes a different path by its number of rows, and the paths sum in different
orders. One row is XLA's own fused GEMV (partial sums in vector lanes along `in`, then across them);
from two rows the dot goes to YNNPACK; the packed few-row products (`qmatmul._few_row_product`) add
per-row GEMVs at 2-3 rows and tiles at 4-64, the whole product past 64. Attention switches from its
dense to its tiled form once a block table reaches `paged_attention.TILED_MIN_KEYS` keys, and the
longest row sets the table's width. A seeded sampled request alone and the same request among other
rows then differ in the last bits of their logits, and can draw different tokens at a near tie.

Products (`qmatmul_invariant`, `matmul_invariant`): one form at every row count. W goes a tile of its
rows at a time (`lax.map`, `tile_rows`: set by W's shape alone), each tile dequantized into f32 and
multiplied with all the rows by YNNPACK as `x @ tile.T`, one row padded to two (XLA keeps one-row
products for its GEMV). YNNPACK always packs a right-hand side it contracts along its minor axis, and
plans that packing and its kernel from W's shape alone (the row count is not known when it plans), so
each output sums over `in` in one order whatever the rows (tests/test_batch_invariant.py: bit for bit
at 1-65 rows for every format; 1-2048 rows measured, bench/RESULTS.md). Contracting an `[in, out]`
weight instead, YNNPACK packs it or not by the row count, and the results change from 33 rows: the
tile must stay a runtime value in its `[out, in]` layout (a constant weight is folded into `[in, out]`).

Sums over a row (`tree_sum`: the norms' means, attention's denominators): XLA:CPU vectorizes a reduction
by the array's whole shape, so a row's sum changed with the rows beside it (RMSNorm over 576 features:
a [1, 4] and a [2, 4] batch of rows disagreed); here a fixed tree of elementwise adds.

Attention (`paged_attention_invariant`): the tiled (online-softmax) form for every call, decode rows
included, over key tiles of a fixed KEY_TILE, its denominators summed by `tree_sum`. A key tile past a
row's keys (there for another row) leaves the row's running max, denominator and sum exactly as they
were, so a query's result depends only on its own keys, whatever the table's width, the rows beside it
or how its tokens were chunked.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dequant import dequantize_packed
from pallas_kernels.formats import LAYOUTS
from pallas_kernels.tiled_attention import tiled_paged_attention

TILE_BYTES = 256 * 1024  # f32 bytes of a tile of W (kept in cache while every row is multiplied)
# Keys per step of the invariant attention: the narrowest block table's keys, so a short context's decode
# row gathers no more than the dense form would (the tiled form's own 512 gathers 4x that).
KEY_TILE = 128


def tile_rows(out_in: tuple[int, int], itemsize: int = 4) -> int:
    """Rows of W per tile: the most whose dequantized form fits TILE_BYTES (a multiple of 8, at least 8,
    at most `out`). W's shape alone sets it, never the number of rows multiplied."""
    out_features, in_features = out_in
    return min(out_features, max(8, TILE_BYTES // (in_features * itemsize) // 8 * 8))


def qmatmul_invariant(
    x: jax.Array, arrays: Mapping[str, jax.Array], *, fmt: str, out_in: tuple[int, int]
) -> jax.Array:
    """`x @ W.T` for the `[out, in]` weight W that `arrays`, the fields of `fmt`'s layout, pack: f32
    accumulation, in x's dtype, each row's result independent of the other rows (above)."""
    return _product(x, arrays, fmt, out_in, x.dtype)


def matmul_invariant(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """`x @ w.T` for a float weight `[out, in]` (cast to x's dtype), f32 accumulation, in `out_dtype`
    (default x's): `matmul_t`'s contract, each row's result independent of the other rows."""
    fmt = FLOAT_FORMATS.get(jnp.dtype(w.dtype))
    if fmt is None:
        raise ValueError(
            f"a float weight of dtype {w.dtype} has no invariant product (float32, float16, bfloat16)"
        )
    return _product(x, {"w": w}, fmt, w.shape[-2:], out_dtype or x.dtype)


FLOAT_FORMATS = {
    jnp.dtype(jnp.float32): "F32",
    jnp.dtype(jnp.float16): "F16",
    jnp.dtype(jnp.bfloat16): "BF16",
}


def _product(
    x: jax.Array, arrays: Mapping[str, jax.Array], fmt: str, out_in: tuple[int, int], out_dtype: jnp.dtype
) -> jax.Array:
    """W a tile of rows at a time under `lax.map`, each tile's product by YNNPACK with at least two rows."""
    out_features, in_features = out_in
    if lead := LAYOUTS[fmt].lead_shape(arrays):
        raise ValueError(
            f"the invariant product takes one [out, in] weight; index the stacked axes {lead} first"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features, the {fmt} weight {tuple(out_in)} expects {in_features}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    if rows == 1:  # two rows: YNNPACK's product, not XLA's one-row GEMV
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    tile = tile_rows(out_in, x.dtype.itemsize)
    count, rest = divmod(out_features, tile)

    def product(part: Mapping[str, jax.Array], n: int) -> jax.Array:
        w = dequantize_packed(part, fmt=fmt, out_in=(n, in_features), dtype=x.dtype)
        return jnp.matmul(x2, w.T, preferred_element_type=jnp.float32).astype(out_dtype)

    def tile_at(i: jax.Array) -> jax.Array:  # W's rows i * tile .. (i + 1) * tile, read in place
        part = {n: lax.dynamic_slice_in_dim(v, i * tile, tile, axis=0) for n, v in arrays.items()}
        return product(part, tile)

    y = lax.map(tile_at, jnp.arange(count, dtype=jnp.int32))  # [count, rows, tile]
    y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], count * tile)
    if rest:
        y = jnp.concatenate([y, product({n: v[count * tile :] for n, v in arrays.items()}, rest)], axis=-1)
    return y[:rows].reshape(*lead, out_features)


def tree_sum(x: jax.Array) -> jax.Array:
    """`x`'s sum over its last axis as a fixed tree of elementwise adds (zero-padded to a power of two,
    halves added until one is left): XLA:CPU's own reductions vectorize by the array's whole shape, so
    a row's sum changed with the number of rows beside it."""
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << max(n - 1, 0).bit_length()) - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def paged_attention_invariant(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """`paged_attention_xla`'s contract in one form for decode rows, prompt chunks and verifies alike: the
    tiled (online-softmax) form. The XLA op switches form by the block table's width, which the longest
    row of the batch sets; here a query's result depends only on the keys it sees: a key tile past them
    (another row's) leaves its running max, denominator and sum exactly as they were."""
    return tiled_paged_attention(
        q,
        k_cache,
        v_cache,
        layer,
        block_tables,
        positions,
        context_lens,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        key_tile=KEY_TILE,
        row_sum=tree_sum,
    )


# The tiled form visits only the key tiles a row sees, for decode rows and prompt chunks alike.
paged_attention_invariant.cost_follows_context = lambda table_keys, *, decode: True  # type: ignore[attr-defined]
