"""Attention over a block-table (paged) KV cache.

Layout: the cache of every layer is one array `[layers, num_blocks, block_size, num_kv_heads, head_dim]`
and ops take a layer index into it: the model runs its layers under `lax.scan` with the cache in the
carry, so the (donated) cache is updated in place instead of being copied each step. A sequence's block
table lists the physical blocks holding its logical blocks 0, 1, 2...; token `i` of a sequence lives in
block `block_table[i // block_size]` at offset `i % block_size`. A slot is `block * block_size + offset`.

Queries come as a padded batch `[batch, q_len, num_heads, head_dim]` with the absolute position of each
query token: this one shape covers decode (q_len 1), whole-prompt prefill and chunked prefill on top of
a cached prefix. Query token at position p attends to the keys at positions <= p (and > p - window).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.occupancy import auto_splits
from pallas_kernels.read_widths import narrows, read_narrowest
from pallas_kernels.shapes import MIN_DOT_DIM, next_power_of_2
from pallas_kernels.tiled_attention import NEG_INF, cap_scores, tiled_paged_attention, visible

# `jax.experimental.pallas.triton` (GPU compiler parameters, masked loads) is imported by the functions
# that use it: its MLIR dialects cost every process about 5 MiB of resident memory, GPU or not.

# Prompt chunks over tables of at least this many keys take the tiled (flash-style) form: at a 512-token
# chunk it took 0.6x the dense form's CPU time, at 2,048 tokens 0.14x, and at a 1,904-token chunk over a
# 6,000-token context 0.07x (bench/RESULTS.md, "CPU prefill of long prompts"); over 256-key tables, the
# prefill step of 144- and 256-token prompts 0.87x (demo), 0.87-0.93x (Gemma-3-270M), 0.96x (Qwen2.5-0.5B)
# the dense form's time (bench/RESULTS.md, "Greedy and sampled in one step").
TILED_MIN_KEYS = 256
# Decode under a sliding window narrower than the block table reads each row's window's pages only
# (`_windowed_decode`). Read when tracing, so a benchmark may set it between compiles.
WINDOWED_DECODE = True
# Decode attends its rows a chunk at a time (`_dense_decode`), each chunk gathering at most this many key
# elements (rows x keys x KV heads x head_dim: 1 MiB of keys in f32), so its gathered pages are still in
# cache when its dots read them. The demo's decode step at 512 keys took 0.79-0.85x the CPU time at 32
# rows, 0.86x at 16, 0.88x at 8; Gemma-3-270M's 0.91-0.97x at 32; Qwen2.5-0.5B's 0.91x at 32 (bench/
# RESULTS.md, "Decode attention at 2-64 rows"). Read when tracing, so a benchmark may set these between
# compiles.
DECODE_CHUNK_ELEMENTS = 2**18
# ... once the rows gather more than this many together: below it the chunks' loop cost about what they
# saved (demo, 32 rows over 112 keys, 0.69 M elements: 1.02x; Qwen2.5-0.5B, 32 over 160, 0.66 M:
# 1.02-1.05x; the demo's 32 over 160, 0.98 M: 0.90-0.95x).
DECODE_CHUNK_FROM = 3 * 2**18


def write_kv_xla(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values `[batch, q_len, kv_heads, head_dim]` into their slots of `layer`;
    slot -1 is padding."""
    num_blocks, block_size = k_cache.shape[1:3]
    slots = slot_mapping.reshape(-1)
    blocks = jnp.where(slots < 0, num_blocks, slots // block_size)  # out of range: dropped by the scatter
    offsets = slots % block_size

    def scatter(cache: jax.Array, new: jax.Array) -> jax.Array:
        new = new.reshape(-1, *new.shape[2:]).astype(cache.dtype)
        return cache.at[layer, blocks, offsets].set(new, mode="drop")

    return scatter(k_cache, k), scatter(v_cache, v)


def paged_attention_xla(
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
    tiled: bool | None = None,
    narrowed: bool | None = None,
) -> jax.Array:
    """Reference: gather every page of the block table, mask by position and length, softmax in f32.

    q: [B, T, Hq, D]; caches: [layers, num_blocks, block_size, Hkv, D]; block_tables: [B, NB];
    positions: [B, T] absolute query positions; context_lens: [B] number of valid keys.
    Returns [B, T, Hq, D] in q's dtype.

    `tiled`: run `tiled_paged_attention` (the same result without a [T x NB * block_size] score matrix,
    visiting only the keys each query tile sees); None: for several query tokens over a table of at
    least `TILED_MIN_KEYS` keys, the dense form otherwise (decode, short chunks).
    `narrowed`: read only the table's first columns that hold the longest context (`read_widths`);
    None: for a decode (one query token, `narrows`), and, under a sliding window narrower than the table,
    each row's window's pages only (`_windowed_decode`).
    A decode whose rows gather many keys together attends them a chunk of rows at a time (`_dense_decode`).
    """
    if tiled is None:
        tiled = q.shape[1] > 1 and block_tables.shape[1] * k_cache.shape[2] >= TILED_MIN_KEYS
    inputs = (q, k_cache, v_cache, layer)
    options = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    window_pages = _window_pages(sliding_window, k_cache.shape[2])
    windowed = WINDOWED_DECODE and q.shape[1] == 1 and not tiled and window_pages < block_tables.shape[1]
    if narrowed is None and windowed:
        # Decode under a window narrower than the table: each row reads only its window's pages.
        return _windowed_decode(*inputs, block_tables, positions, context_lens, window_pages, **options)
    if narrowed is None:
        narrowed = q.shape[1] == 1 and not tiled and narrows(block_tables.shape[1] * k_cache.shape[2])
    if narrowed:
        return read_narrowest(
            lambda tables: paged_attention_xla(
                *inputs, tables, positions, context_lens, tiled=False, narrowed=False, **options
            ),
            block_tables,
            context_lens,
            k_cache.shape[2],
        )
    attend = tiled_paged_attention if tiled else _dense_attention if q.shape[1] > 1 else _dense_decode
    return attend(*inputs, block_tables, positions, context_lens, **options)


def cost_follows_context(table_keys: int, *, decode: bool) -> bool:
    """Whether `paged_attention_xla` over a block table of `table_keys` keys costs what its rows' contexts
    need whatever the table's width: a decode that narrows (`read_widths`) or a prompt chunk that takes
    the tiled form. The engine sends such calls over longer contexts its widest table, one compiled
    shape for all of them (`jaxrs.engine.runner.ModelRunner.width`)."""
    return narrows(table_keys) if decode else table_keys >= TILED_MIN_KEYS


paged_attention_xla.cost_follows_context = cost_follows_context  # type: ignore[attr-defined]


def decode_chunk_rows(rows: int, row_elements: int) -> int:
    """How many decode rows one chunk of `_dense_decode` takes when each gathers `row_elements` key
    elements: all of them while they gather at most `DECODE_CHUNK_FROM` together, else the most that
    gather at most `DECODE_CHUNK_ELEMENTS` (but at least two: Gemma-3-270M's 32 rows at 512 keys took
    0.94x the CPU time a row a chunk, 0.91x two) and divide `rows`."""
    if rows * row_elements <= DECODE_CHUNK_FROM:
        return rows
    most = max(2, DECODE_CHUNK_ELEMENTS // row_elements)
    return max(d for d in range(1, min(most, rows) + 1) if rows % d == 0)


def _window_pages(sliding_window: int | None, block_size: int) -> int:
    """How many pages hold every key a decode row sees under `sliding_window` (unbounded without one)."""
    if sliding_window is None:
        return 2**31 - 1
    return -(-(sliding_window - 1) // block_size) + 1


def _windowed_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    context_lens: jax.Array,
    window_pages: int,
    **options,
) -> jax.Array:
    """Decode (one query token a row) over only the `window_pages` table columns from the page holding
    the row's first visible key (Gemma 3's 512-token window: 33 pages, whatever the table's width), the
    longest of them narrowed as `read_widths` does for several rows. A row near the table's start
    takes its first `window_pages` columns."""
    block_size = k_cache.shape[2]
    width = block_tables.shape[1]
    first = jnp.clip(positions[:, 0] - options["sliding_window"] + 1, 0, None) // block_size  # [B]
    first = jnp.minimum(first, width - window_pages)  # a whole window inside the table
    columns = first[:, None] + jnp.arange(window_pages)[None, :]
    tables = jnp.take_along_axis(block_tables, columns, axis=1)
    attend = functools.partial(
        _dense_decode,
        q,
        k_cache,
        v_cache,
        layer,
        positions=positions,
        context_lens=context_lens,
        key_start=first * block_size,
        **options,
    )
    if narrows(window_pages * block_size):  # rows whose windows start late need less
        lengths = context_lens - first * block_size
        return read_narrowest(lambda t: attend(block_tables=t), tables, lengths, block_size)
    return attend(block_tables=tables)


def _dense_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    context_lens: jax.Array,
    *,
    key_start: jax.Array | int = 0,
    **options,
) -> jax.Array:
    """`_dense_attention` of one query token a row, `decode_chunk_rows` rows at a time under `lax.map`
    when the rows gather many keys together: each chunk's gathered pages (f32 for the dots) then stay
    small enough to be read back from cache by its dots, where the whole batch's are written out to
    memory and read back."""
    batch = q.shape[0]
    row_elements = block_tables.shape[1] * math.prod(k_cache.shape[2:])
    rows = decode_chunk_rows(batch, row_elements)
    per_row = dict(q=q, block_tables=block_tables, positions=positions, context_lens=context_lens)
    if jnp.ndim(key_start):
        per_row["key_start"] = key_start
    else:
        options["key_start"] = key_start
    attend = functools.partial(_dense_attention, k_cache=k_cache, v_cache=v_cache, layer=layer, **options)
    if rows == batch:
        return attend(**per_row)
    chunks = jax.tree.map(lambda x: x.reshape(batch // rows, rows, *x.shape[1:]), per_row)
    return lax.map(lambda chunk: attend(**chunk), chunks).reshape(q.shape)


def _dense_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    key_start: jax.Array | int = 0,
) -> jax.Array:
    """Every page of `block_tables` gathered, masked by position and length, softmax in f32; the table's
    first key sits at position `key_start` ([B] or a scalar)."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[3]
    group = num_heads // num_kv_heads
    k = k_cache[layer, block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    v = v_cache[layer, block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = cap_scores(scores, soft_cap)
    key_pos = jnp.reshape(key_start, (-1, 1, 1)) + jnp.arange(k.shape[1])[None, None, :]
    mask = visible(key_pos, positions[:, :, None], context_lens[:, None, None], sliding_window)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    if q_len == 1:
        # Decode: the weighted sum of values as products and sums, not a dot, so XLA:CPU writes the
        # output in the order o_proj reads (a dot's output was transposed inside o_proj's GEMV); the
        # scores stay a dot, whose reduction XLA:CPU runs far faster. bench/bench_cpu_attention.py, 30
        # layers plus o_proj, one row at 1,024 keys: 9.4 ms this way, 22.4 as two dots, 18.6 as sums.
        weights = probs.transpose(0, 3, 4, 1, 2)[..., None]  # [b, k, g, t, s] -> [b, t, s, k, g, 1]
        out = jnp.sum(weights * v[:, None, :, :, None].astype(jnp.float32), axis=2)
    else:
        dtype = jnp.promote_types(q.dtype, v.dtype)  # a float16 cache under float32 compute: float32
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


# --------------------------------------------------------------------------------------------------------
# Pallas kernel (GPU Triton lowering; interpret mode on CPU)
# --------------------------------------------------------------------------------------------------------


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceil division of a non-negative traced int by a static positive int."""
    return lax.div(a + (b - 1), b)


def _paged_attention_kernel(
    # inputs: whole arrays in memory (no BlockSpec), indexed here
    layer_ref,  # [1] int32
    context_lens_ref,  # [B] int32
    block_tables_ref,  # [B, NBp] int32, NBp a multiple of pages_per_step
    row_positions_ref,  # [B, Rp] int32: absolute position of each query row
    q_ref,  # [B, Hkv, Rp, Dp]: row r = query token r // Gp, head r % Gp of the kv head's group
    k_ref,  # [layers, num_blocks, block_size, Hkv, Dp]
    v_ref,  # [layers, num_blocks, block_size, Hkv, Dp]
    # outputs: normalized [B, Hkv, Rp, Dp] when num_splits == 1, else unnormalized partials
    # acc [S, B, Hkv, Rp, Dp] f32, running max m [S, B, Hkv, Rp] f32 and denominator l [S, B, Hkv, Rp] f32
    *out_refs,
    block_size: int,
    pages_per_step: int,
    rows_per_block: int,
    num_splits: int,
    max_context: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    """One program: `rows_per_block` query rows of one kv head of one sequence (one KV split of them).

    It walks the sequence's KV pages `pages_per_step` at a time, reading their physical ids from the
    block table, and keeps a flash-attention running max / denominator / accumulator in f32. Only the
    pages the rows can see are visited: up to min(context_len, max position + 1) and, with a sliding
    window, from the first step holding min position - window + 1. With `num_splits > 1` those steps
    are shared out evenly between the splits (program axis 3) and the partials are combined outside.
    """
    batch_idx, kv_head, row_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    keys_per_step = pages_per_step * block_size
    head_dim = q_ref.shape[-1]
    rows = pl.ds(row_block * rows_per_block, rows_per_block)

    layer = layer_ref[0]
    context_len = context_lens_ref[batch_idx]
    query_pos = row_positions_ref[batch_idx, rows]  # [R]
    q = q_ref[batch_idx, kv_head, rows, :]  # [R, Dp]

    kv_end = jnp.clip(jnp.minimum(context_len, jnp.max(query_pos) + 1), 0, max_context)
    kv_start = 0
    if sliding_window is not None:
        kv_start = jnp.clip(jnp.min(query_pos) - sliding_window + 1, 0, kv_end)
    first_step = lax.div(kv_start, keys_per_step)
    num_steps = _cdiv(kv_end, keys_per_step) - first_step
    if num_splits > 1:
        split = pl.program_id(3)
        steps_per_split = _cdiv(num_steps, num_splits)
        first_step += split * steps_per_split
        num_steps = jnp.clip(num_steps - split * steps_per_split, 0, steps_per_split)

    key_offsets = jnp.arange(keys_per_step, dtype=jnp.int32)
    # f32: full-precision matmuls (Triton's default for f32 would be TF32)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def step(i, carry):
        acc, running_max, denom = carry
        first_page = (first_step + i) * pages_per_step
        page_ids = block_tables_ref[batch_idx, pl.ds(first_page, pages_per_step)]  # [P]
        k = k_ref[layer, page_ids, :, kv_head, :].reshape(keys_per_step, head_dim).astype(q.dtype)
        v = v_ref[layer, page_ids, :, kv_head, :].reshape(keys_per_step, head_dim).astype(q.dtype)

        scores = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        scores = cap_scores(scores * scale, soft_cap)
        key_pos = (first_page * block_size + key_offsets)[None, :]  # [1, K]
        mask = visible(key_pos, query_pos[:, None], context_len, sliding_window)
        scores = jnp.where(mask, scores, NEG_INF)

        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.where(mask, jnp.exp(scores - new_max[:, None]), 0.0)
        denom = denom * correction + jnp.sum(probs, axis=1)
        pv = lax.dot_general(
            probs.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return acc * correction[:, None] + pv, new_max, denom

    acc = jnp.zeros((rows_per_block, head_dim), jnp.float32)
    running_max = jnp.full((rows_per_block,), NEG_INF, jnp.float32)
    denom = jnp.zeros((rows_per_block,), jnp.float32)
    acc, running_max, denom = lax.fori_loop(0, num_steps, step, (acc, running_max, denom))

    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # rows that see no key: 0, not NaN
        o_ref[batch_idx, kv_head, rows, :] = out.astype(o_ref.dtype)
    else:
        acc_ref, max_ref, denom_ref = out_refs
        split = pl.program_id(3)
        acc_ref[split, batch_idx, kv_head, rows, :] = acc
        max_ref[split, batch_idx, kv_head, rows] = running_max
        denom_ref[split, batch_idx, kv_head, rows] = denom


def _combine_splits(acc: jax.Array, running_max: jax.Array, denom: jax.Array) -> jax.Array:
    """Merge the per-split partials (leading axis) of the online softmax into normalized outputs."""
    global_max = jnp.max(running_max, axis=0)
    weight = jnp.exp(running_max - global_max)  # empty splits: acc = denom = 0, any weight is fine
    total = jnp.sum(weight * denom, axis=0)
    out = jnp.sum(weight[..., None] * acc, axis=0)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def paged_attention_pallas(
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
    interpret: bool | None = None,
    rows_per_block: int = 64,
    keys_per_step: int = 64,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:
    """Pallas paged attention with the semantics and positional signature of `paged_attention_xla`.

    Grid (batch, kv_head, query row block[, kv split]). The queries of one kv head are laid out as rows
    (token-major, each token's group of query heads padded to a power of two), so one program serves
    GQA, decode (q_len 1) and (chunked) prefill alike; each program loops over the KV pages its rows can
    see (see `_paged_attention_kernel`). The kernel takes whole arrays and indexes pages itself.

    Tuning (keyword-only): `rows_per_block` query rows per program (rounded to a power of two, >= 16,
    at most the padded row count); `keys_per_step` keys per loop step (whole pages, >= 16);
    `num_splits` splits each program's KV range over that many programs (flash-decoding; partials
    combined in XLA), for long contexts with few query rows; None: as many as fill a GPU when the grid is
    small (`occupancy.auto_splits` over the table's width, a decode of few sequences), none when
    interpreted; `num_warps` (default 4, 8 for big tiles) and `num_stages` for Triton.
    `interpret=None` interprets on CPU and compiles (Triton) elsewhere.

    Padding done here: group size and head dim to powers of two (head dim >= 16), query rows to a
    multiple of the row block, the block table to whole steps (ids clipped into range). A head dim
    that is not a power of two pads the whole cache (a copy per call): slow, correct.
    """
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    batch, q_len, num_heads, head_dim = q.shape
    _, num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    group = num_heads // num_kv_heads
    group_p = next_power_of_2(group)
    dim_p = next_power_of_2(head_dim, MIN_DOT_DIM)
    pages_per_step = next_power_of_2(keys_per_step // block_size, MIN_DOT_DIM // block_size)
    num_rows = q_len * group_p
    rows_per_block = min(next_power_of_2(rows_per_block, MIN_DOT_DIM), next_power_of_2(num_rows, MIN_DOT_DIM))
    padded_rows = pl.cdiv(num_rows, rows_per_block) * rows_per_block
    dtype = jnp.promote_types(q.dtype, k_cache.dtype)
    if num_warps is None:
        num_warps = 8 if rows_per_block * dim_p >= 128 * 128 or dim_p >= 256 else 4

    # q [B, T, Hkv * G, D] -> rows [B, Hkv, T * Gp, Dp]
    q_rows = q.astype(dtype).reshape(batch, q_len, num_kv_heads, group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, 0), (0, group_p - group), (0, dim_p - head_dim)))
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, num_rows, dim_p)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - num_rows), (0, 0)))
    # padding rows repeat the last position: they widen no row block's KV range
    row_positions = jnp.repeat(positions.astype(jnp.int32), group_p, axis=1)
    row_positions = jnp.pad(row_positions, ((0, 0), (0, padded_rows - num_rows)), mode="edge")
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        programs = batch * num_kv_heads * (padded_rows // rows_per_block)
        steps = pl.cdiv(max_context, pages_per_step * block_size)
        num_splits = 1 if interpret else auto_splits(programs, steps)
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1)
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % pages_per_step)))
    if dim_p != head_dim:
        pad = ((0, 0),) * 4 + ((0, dim_p - head_dim),)
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    grid = (batch, num_kv_heads, padded_rows // rows_per_block)
    rows_shape = (batch, num_kv_heads, padded_rows)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((*rows_shape, dim_p), dtype)]
    else:
        grid += (num_splits,)
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, *rows_shape, dim_p), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *rows_shape), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *rows_shape), jnp.float32),
        ]
    kernel = functools.partial(
        _paged_attention_kernel,
        block_size=block_size,
        pages_per_step=pages_per_step,
        rows_per_block=rows_per_block,
        num_splits=num_splits,
        max_context=max_context,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"paged_attention_r{rows_per_block}_p{pages_per_step}_s{num_splits}",
    )(layer, context_lens.astype(jnp.int32), tables, row_positions, q_rows, k_cache, v_cache)
    out = outs[0] if num_splits == 1 else _combine_splits(*outs)

    out = out[:, :, :num_rows].reshape(batch, num_kv_heads, q_len, group_p, dim_p)
    out = out[..., :group, :head_dim].transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
