"""Flash-style (online-softmax) attention over the paged KV cache in plain XLA, for long prompt chunks.

The dense form (`paged_attention.paged_attention_xla` below its threshold) gathers every page of the
block table and materializes a [query rows x table width] f32 score matrix per head, which several
passes then write and read (mask, max, exp, sum, normalize): at a 2,048-token chunk over an 8,192-key
table that is 600 MB a layer, and the keys above the diagonal cost as much as those below. Here the
chunk's queries are cut into tiles of `query_tile` tokens, and each tile walks only the key tiles its
positions can see (up to its last position, and from its first position's window start), gathering
`key_tile` keys a step from the block table and keeping a running max, denominator and accumulator in
f32: the Pallas kernel's algorithm, as XLA loops. Nothing larger than [tile rows x key_tile] exists, and
the key tiles every row of a query tile sees whole (all but the diagonal and a window's edge) skip the
mask. The running max starts above the masking value, so a masked score's exp is 0 without a select.

Also home of what both forms (and the Pallas kernel) share: which keys a query sees, and the soft-cap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite, so a fully masked (padding) row gives zeros instead of NaN
# The running max starts here, above NEG_INF and below any real score, so a masked score's exp is exactly
# 0 even in a row that has seen no key yet: no second select over the tile's probabilities.
_MAX_FLOOR = NEG_INF / 2
# The default tiles: query tokens a tile, keys a step. 256 keys rather than 512: a query tile then walks
# less of the square above the causal diagonal (a 512-token prompt's two query tiles take 3 key tiles of
# 256, not 2 of 512), and its [rows x keys] f32 score tiles are half the size. Attention alone, CPU time,
# interleaved (bench/bench_prefill_attention.py): Gemma-3-270M heads 0.099 -> 0.084 s at 512 tokens,
# 0.905 -> 0.895 at 2,048; Qwen2.5-0.5B heads 0.116 -> 0.096 and 1.061 -> 0.992; SmolLM2 heads on cached
# prefixes of 2,048 and 4,096 keys 1.031 -> 0.933 and 1.502 -> 1.485; 128:128 was no better (bench/RESULTS.md,
# "Prefill of the larger models, third round").
QUERY_TILE = 256
KEY_TILE = 256


def visible(
    key_pos: jax.Array, query_pos: jax.Array, context_lens: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Whether the key at `key_pos` is seen by the query at `query_pos` (broadcast against each other and
    `context_lens`): causal, inside the context, and inside the window if there is one."""
    mask = (key_pos <= query_pos) & (key_pos < context_lens)
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def cap_scores(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """Gemma 2's attention-logit soft-cap, `cap * tanh(s / cap)`; identity without one."""
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def tiled_paged_attention(
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
    query_tile: int | None = None,
    key_tile: int | None = None,
    row_sum: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """`paged_attention_xla`'s semantics, tile by tile (see the module docstring).

    `query_tile` tokens per query tile (the rows of a tile are its tokens times the query heads of a kv
    head); `key_tile` keys per step, rounded to whole pages (None: `QUERY_TILE`, `KEY_TILE`). The key
    range of a tile is the union over the batch, so rows of very different lengths share one walk (the
    engine sends long chunks alone).
    `row_sum`: sums the probabilities over the last axis (default `jnp.sum`; `batch_invariant`'s own).
    """
    batch, q_len, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    dtype = jnp.promote_types(q.dtype, v_cache.dtype)  # a float16 cache under float32 compute: float32

    query_tile = min(query_tile or QUERY_TILE, q_len)
    key_tile = key_tile or KEY_TILE
    pad = -q_len % query_tile
    num_tiles = (q_len + pad) // query_tile
    rows = query_tile * group  # row r of a tile: token r // group, query head r % group of the kv head
    # padding tokens repeat the last position, so they widen no tile's key range
    positions = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, pad)), mode="edge")
    q = jnp.pad(q.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    if soft_cap is None:  # the scale on the queries: one multiply per query, not per score
        q, scale = q * jnp.asarray(scale, dtype), 1.0
    q_tiles = q.reshape(batch, num_tiles, query_tile, num_kv_heads, group, head_dim)
    q_tiles = q_tiles.transpose(1, 0, 3, 2, 4, 5).reshape(num_tiles, batch, num_kv_heads, rows, head_dim)
    pos_tiles = positions.reshape(batch, num_tiles, query_tile).transpose(1, 0, 2)

    pages = max(1, key_tile // block_size)
    keys = pages * block_size
    tables = block_tables.astype(jnp.int32)
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % pages)))
    max_keys = tables.shape[1] * block_size
    context_lens = context_lens.astype(jnp.int32)
    key_offsets = jnp.arange(keys, dtype=jnp.int32)
    # A table of one key tile runs that tile once, masked: as three loops (window edge, unmasked middle,
    # diagonal), XLA:CPU hoists the tile's gathers and score product out of each loop as loop-invariant,
    # and runs all three whatever the trip counts (a 512-token prompt's scores computed three times).
    single_tile = tables.shape[1] == pages

    def gather(cache: jax.Array, ids: jax.Array) -> jax.Array:
        """The pages `ids` [B, P] of this layer as [B, Hkv, keys, D]."""
        pages_kv = cache[layer, ids].reshape(batch, keys, num_kv_heads, head_dim)
        return pages_kv.transpose(0, 2, 1, 3).astype(dtype)

    def attend_tile(tile: tuple[jax.Array, jax.Array]) -> jax.Array:
        q_tile, pos = tile  # [B, Hkv, rows, D], [B, query_tile]
        row_pos = jnp.repeat(pos, group, axis=1)[:, None, :, None]  # [B, 1, rows, 1]
        first_pos, last_pos = jnp.min(pos, axis=1), jnp.max(pos, axis=1)
        kv_end = jnp.clip(jnp.max(jnp.minimum(context_lens, last_pos + 1)), 0, max_keys)
        # keys every row sees: [all_start, all_end); a tile inside it needs no mask
        all_end = jnp.clip(jnp.min(jnp.minimum(context_lens, first_pos + 1)), 0, kv_end)
        kv_start = all_start = 0
        if sliding_window is not None:
            kv_start = jnp.clip(jnp.min(first_pos - sliding_window + 1), 0, kv_end)
            all_start = jnp.max(last_pos - sliding_window + 1)
        first, last = kv_start // keys, -(-kv_end // keys)
        unmasked_first = jnp.clip(-(-all_start // keys), first, last)
        unmasked_last = jnp.clip(all_end // keys, unmasked_first, last)

        def step(j: jax.Array, carry: tuple, *, masked: bool) -> tuple:
            acc, running_max, denom = carry
            ids = lax.dynamic_slice_in_dim(tables, j * pages, pages, axis=1)
            k, v = gather(k_cache, ids), gather(v_cache, ids)
            scores = jnp.einsum("bkrd,bksd->bkrs", q_tile, k, preferred_element_type=jnp.float32)
            scores = cap_scores(scores if scale == 1.0 else scores * scale, soft_cap)
            if masked:
                key_pos = (j * keys + key_offsets)[None, None, None, :]
                mask = visible(key_pos, row_pos, context_lens[:, None, None, None], sliding_window)
                scores = jnp.where(mask, scores, NEG_INF)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            correction = jnp.exp(running_max - new_max)
            probs = jnp.exp(scores - new_max[..., None])  # masked: exp(<= NEG_INF / 2) = 0
            denom = denom * correction + (row_sum(probs) if row_sum else jnp.sum(probs, axis=-1))
            pv = jnp.einsum("bkrs,bksd->bkrd", probs.astype(dtype), v, preferred_element_type=jnp.float32)
            return acc * correction[..., None] + pv, new_max, denom

        carry = (
            jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32),
            jnp.full((batch, num_kv_heads, rows), _MAX_FLOOR, jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows), jnp.float32),
        )
        if single_tile:  # one step, no loops (see `single_tile`)
            acc, _, denom = step(0, carry, masked=True)
            return acc / jnp.where(denom > 0, denom, 1.0)[..., None]
        masked, unmasked = functools.partial(step, masked=True), functools.partial(step, masked=False)
        carry = lax.fori_loop(first, unmasked_first, masked, carry)  # the window's lower edge
        carry = lax.fori_loop(unmasked_first, unmasked_last, unmasked, carry)
        acc, _, denom = lax.fori_loop(unmasked_last, last, masked, carry)  # the diagonal, the context's end
        return acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # rows that see no key: 0, not NaN

    out = lax.map(attend_tile, (q_tiles, pos_tiles))  # [tiles, B, Hkv, rows, D]
    out = out.reshape(num_tiles, batch, num_kv_heads, query_tile, group, head_dim)
    out = out.transpose(1, 0, 3, 2, 4, 5).reshape(batch, num_tiles * query_tile, num_heads, head_dim)
    return out[:, :q_len].astype(q.dtype)
