"""Decode attention over the paged KV cache on XLA:CPU: the formulations compared, per model head shape.

    JAX_PLATFORMS=cpu python bench/bench_cpu_attention.py [--shapes demo qwen05 gemma]
        [--cases 1:1024:80 1:512:64 32:128:16] [--cache-dtypes float16] [--variants ...] [--layers 30]
        [--repeats 9]

A case is ROWS:CONTEXT:WIDTH: ROWS sequences, each CONTEXT tokens long, with block tables WIDTH blocks
wide (16-token blocks, physical blocks shuffled), one query token each. A shape is a real model's heads:
demo (SmolLM2-135M: 9 query / 3 KV heads, head_dim 64, hidden 576), qwen05 (Qwen2.5-0.5B: 14 / 2, 64,
896), gemma (Gemma-3-270M: 4 / 1, 256, hidden 640, every layer with its 512-token sliding window, the
dearer kind for a mask). Every layer runs attention then o_proj (in U8M, the packed CPU layout) under
`lax.scan`, as a decode step does, compiled with the engine's step options: o_proj is kept because how
attention writes its output decides how o_proj's GEMV reads it. Variants (ms per step, all layers):

- jaxrs: `paged_attention_xla` (scores a dot per KV head over keys transposed to [kv_head, s, d], the
  weighted sum of values as products and sums, rows a chunk at a time past `DECODE_CHUNK_ELEMENTS`),
  reading the whole table like the others (not narrowed);
- dots / products: both as dots, both as products and sums (the multi-row and one-row forms before);
- block_diagonal: the keys and values in the pages' own [s, kv_heads * d] layout, no transpose: scores for
  every head as one product with a block-diagonal query matrix [q_heads, kv_heads * d], values as
  P[q_heads, s] @ V[s, kv_heads * d] keeping the diagonal blocks (kv_heads times the arithmetic);
- head_gemvs: one row only; each query head's scores as a one-row product over its KV head's keys
  (XLA's own GEMV), values as products and sums;
- float16_dots: the float16 pages kept through the gather into both dots (converted inside them);
- lean_softmax: jaxrs's with the scale folded into the query and the probabilities normalized after the
  weighted sum, a running-max floor instead of a second select (fewer passes over [heads, s]).
- rows_ORDER_FORM[_lean]: several rows; scores written keys-minor (bkgs, as jaxrs) or group-minor (bksg,
  the order XLA:CPU's dot writes), values as a dot over transposed pages or as products and sums;
- flash_N: flash-decoding over the pages, N table columns a `fori_loop` step with an online softmax;
- unchunked / chunks_N: jaxrs's with all rows at once (as before row chunks) / N rows a chunk.
The last three kinds run only when named in --variants.

Variants run interleaved in one process; each output is checked against jaxrs's first. Reports the median
wall and process CPU time a step; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_facts, markdown_table, write_json
from jax import lax

from jaxrs.engine.runner import STEP_XLA_OPTIONS
from jaxrs.models.layers import dense
from jaxrs.quant import quantize, stack
from pallas_kernels import paged_attention
from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.tiled_attention import NEG_INF, cap_scores, visible

BLOCK = 16
# name: (query heads, KV heads, head_dim, hidden, sliding window)
SHAPES = {"demo": (9, 3, 64, 576, None), "qwen05": (14, 2, 64, 896, None), "gemma": (4, 1, 256, 640, 512)}
F32 = jnp.float32
_FLOOR = NEG_INF / 2  # a running max no lower than this makes a masked score's exp exactly 0


def _gather(cache: jax.Array, layer: jax.Array, tables: jax.Array) -> jax.Array:
    """[b, s, kv_heads, d]: the table's pages of `layer`, in the cache's dtype and layout."""
    return cache[layer, tables].reshape(tables.shape[0], -1, *cache.shape[3:])


def _mask(positions, context_lens, keys: int, window: int | None) -> jax.Array:
    """[b, s]: the keys one query token a row sees."""
    return visible(jnp.arange(keys)[None, :], positions[:, :1], context_lens[:, None], window)


def formulated(scores_as_dot: bool, values_as_dot: bool):
    """Decode attention with each product written as a dot or as products and sums (f32 pages)."""

    def attention(
        q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
    ):
        b, _, heads, d = q.shape
        kv = k_cache.shape[3]
        k, v = (_gather(c, layer, tables).astype(F32) for c in (k_cache, v_cache))
        qg = q.reshape(b, kv, heads // kv, d)
        if scores_as_dot:
            scores = jnp.einsum("bkgd,bskd->bkgs", qg, k)
        else:
            scores = jnp.sum(qg[:, None] * k[:, :, :, None], axis=-1).transpose(0, 2, 3, 1)
        mask = _mask(positions, context_lens, k.shape[1], sliding_window)[:, None, None]
        scores = jnp.where(mask, cap_scores(scores * scale, soft_cap), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        if values_as_dot:
            out = jnp.einsum("bkgs,bskd->bkgd", probs, v)
        else:
            out = jnp.sum(probs.transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None], axis=1)
        return out.reshape(b, 1, heads, d)

    return attention


def block_diagonal(
    q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
):
    """(a) Both products over the pages' own [s, kv_heads * d] layout, all heads at once."""
    b, _, heads, d = q.shape
    kv = k_cache.shape[3]
    k, v = (_gather(c, layer, tables).reshape(b, -1, kv * d).astype(F32) for c in (k_cache, v_cache))
    own = jnp.arange(kv)[None, :] == jnp.arange(heads)[:, None] // (heads // kv)  # [heads, kv]
    q_blocks = jnp.where(own[None, :, :, None], q[:, 0, :, None] * scale, 0.0).reshape(b, heads, kv * d)
    scores = cap_scores(jnp.einsum("bhc,bsc->bhs", q_blocks, k), soft_cap)
    mask = _mask(positions, context_lens, k.shape[1], sliding_window)[:, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    blocks = jnp.einsum("bhs,bsc->bhc", probs, v).reshape(b, heads, kv, d)
    return jnp.sum(jnp.where(own[None, :, :, None], blocks, 0.0), axis=2)[:, None]


def head_gemvs(
    q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
):
    """(b) One row: each head's scores as XLA's one-row GEMV over its KV head's converted keys."""
    _, _, heads, d = q.shape
    kv = k_cache.shape[3]
    group = heads // kv
    k, v = _gather(k_cache, layer, tables)[0], _gather(v_cache, layer, tables)[0]  # [s, kv, d]
    qs = q[0, 0] * scale
    scores = jnp.stack([k[:, h // group].astype(F32) @ qs[h] for h in range(heads)])  # [heads, s]
    mask = _mask(positions, context_lens, k.shape[0], sliding_window)
    probs = jax.nn.softmax(jnp.where(mask, cap_scores(scores, soft_cap), NEG_INF), axis=-1)
    weights = probs.reshape(kv, group, -1).transpose(2, 0, 1)[..., None]  # [s, kv, g, 1]
    return jnp.sum(weights * v[:, :, None].astype(F32), axis=0).reshape(1, 1, heads, d)


def float16_dots(
    q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
):
    """(c) The pages stay in the cache's dtype through the gather; the dots take them (f32 results)."""
    b, _, heads, d = q.shape
    kv = k_cache.shape[3]
    k, v = _gather(k_cache, layer, tables), _gather(v_cache, layer, tables)
    qg = (q * scale).reshape(b, kv, heads // kv, d).astype(k.dtype)
    scores = cap_scores(jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=F32), soft_cap)
    mask = _mask(positions, context_lens, k.shape[1], sliding_window)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(b, 1, heads, d)


def lean_softmax(
    q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
):
    """(d) jaxrs's layouts with fewer passes over the scores: scale in the query, normalize at the end."""
    b, _, heads, d = q.shape
    kv = k_cache.shape[3]
    k, v = _gather(k_cache, layer, tables), _gather(v_cache, layer, tables)
    qg = (q * scale).reshape(b, 1, kv, heads // kv, d)
    scores = cap_scores(jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32), soft_cap)
    mask = _mask(positions, context_lens, k.shape[1], sliding_window)[:, None, None, None]
    scores = jnp.where(mask, scores, NEG_INF)
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), _FLOOR)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1)  # [b, k, g, t]
    out = jnp.sum(weights.transpose(0, 3, 4, 1, 2)[..., None] * v[:, None, :, :, None].astype(F32), axis=2)
    total = total.transpose(0, 3, 1, 2)[..., None]  # [b, t, k, g, 1]
    return (out / jnp.where(total > 0, total, 1.0)).reshape(b, 1, heads, d)


def rows_form(scores_order: str, values_as_dot: bool, lean: bool = False):
    """Several rows: scores as a dot written in `scores_order` ("bkgs": keys minor, as jaxrs; "bksg": the
    group minor, the order XLA:CPU's dot writes), values as a dot over the transposed pages or as products
    and sums; `lean`: the scale in the query and the division after the weighted sum."""

    def attention(
        q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
    ):
        b, _, heads, d = q.shape
        kv = k_cache.shape[3]
        k, v = _gather(k_cache, layer, tables), _gather(v_cache, layer, tables)
        qg = q.reshape(b, kv, heads // kv, d) * (scale if lean else 1.0)
        axis = scores_order.index("s")
        scores = jnp.einsum(f"bkgd,bskd->{scores_order}", qg, k, preferred_element_type=F32)
        scores = cap_scores(scores if lean else scores * scale, soft_cap)
        mask = _mask(positions, context_lens, k.shape[1], sliding_window)
        mask = mask[:, None, None] if axis == 3 else mask[:, None, :, None]
        scores = jnp.where(mask, scores, NEG_INF)
        if lean:
            top = jnp.maximum(jnp.max(scores, axis=axis, keepdims=True), _FLOOR)
            probs = jnp.exp(scores - top)
            total = jnp.sum(probs, axis=axis)  # [b, k, g]
        else:
            probs = jax.nn.softmax(scores, axis=axis)
        probs = probs if axis == 3 else probs.transpose(0, 1, 3, 2)  # [b, k, g, s]
        if values_as_dot:
            out = jnp.einsum("bkgs,bskd->bkgd", probs, v.astype(F32))
        else:
            out = jnp.sum(probs.transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None].astype(F32), axis=1)
        if lean:
            out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return out.reshape(b, 1, heads, d)

    return attention


def paged_flash(chunk_pages: int):
    """(f) Flash-decoding over the pages: `chunk_pages` table columns a loop step, an online softmax, so
    no [rows, table keys] score matrix and no gather of the whole table at once."""

    def attention(
        q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale, sliding_window, soft_cap
    ):
        b, _, heads, d = q.shape
        kv, block = k_cache.shape[3], k_cache.shape[2]
        g = heads // kv
        qg = q.reshape(b, kv, g, d) * scale
        steps = -(-tables.shape[1] // chunk_pages)
        tables_p = jnp.pad(tables, ((0, 0), (0, steps * chunk_pages - tables.shape[1])))
        keys = chunk_pages * block

        def body(i, carry):
            acc, top, total = carry
            cols = lax.dynamic_slice_in_dim(tables_p, i * chunk_pages, chunk_pages, axis=1)
            k, v = _gather(k_cache, layer, cols), _gather(v_cache, layer, cols)
            s = cap_scores(jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=F32), soft_cap)
            key_pos = i * keys + jnp.arange(keys)[None, :]
            m = visible(key_pos, positions[:, :1], context_lens[:, None], sliding_window)[:, None, None]
            s = jnp.where(m, s, NEG_INF)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            fix = jnp.exp(top - new_top)
            p = jnp.exp(s - new_top[..., None])
            pv = jnp.sum(p.transpose(0, 3, 1, 2)[..., None] * v[:, :, :, None].astype(F32), axis=1)
            return acc * fix[..., None] + pv, new_top, total * fix + jnp.sum(p, axis=-1)

        init = (jnp.zeros((b, kv, g, d), F32), jnp.full((b, kv, g), _FLOOR, F32), jnp.zeros((b, kv, g), F32))
        acc, _, total = lax.fori_loop(0, steps, body, init)
        return (acc / jnp.where(total > 0, total, 1.0)[..., None]).reshape(b, 1, heads, d)

    return attention


def row_chunks(rows: int | None):
    """(g) jaxrs's attention `rows` rows a chunk (`paged_attention.DECODE_CHUNK_ELEMENTS` and
    `DECODE_CHUNK_FROM` set for the trace; None: the whole batch at once, as before chunks)."""

    def attention(q, k_cache, v_cache, layer, tables, *args, **options):
        row_elements = tables.shape[1] * math.prod(k_cache.shape[2:])
        saved = paged_attention.DECODE_CHUNK_ELEMENTS, paged_attention.DECODE_CHUNK_FROM
        paged_attention.DECODE_CHUNK_ELEMENTS = 2**62 if rows is None else rows * row_elements
        paged_attention.DECODE_CHUNK_FROM = 0
        try:
            return paged_attention_xla(q, k_cache, v_cache, layer, tables, *args, narrowed=False, **options)
        finally:
            paged_attention.DECODE_CHUNK_ELEMENTS, paged_attention.DECODE_CHUNK_FROM = saved

    return attention


VARIANTS = {
    "jaxrs": functools.partial(paged_attention_xla, narrowed=False),
    "dots": formulated(True, True),
    "products": formulated(False, False),
    "block_diagonal": block_diagonal,
    "head_gemvs": head_gemvs,
    "float16_dots": float16_dots,
    "lean_softmax": lean_softmax,
    "rows_bksg_sum": rows_form("bksg", False),
    "rows_bkgs_dot": rows_form("bkgs", True),
    "rows_bksg_dot": rows_form("bksg", True),
    "rows_bksg_dot_lean": rows_form("bksg", True, lean=True),
    "flash_4": paged_flash(4),
    "flash_8": paged_flash(8),
    "unchunked": row_chunks(None),
    "chunks_2": row_chunks(2),
    "chunks_4": row_chunks(4),
    "chunks_8": row_chunks(8),
    "chunks_16": row_chunks(16),
}


def case_inputs(shape: str, rows: int, context: int, width: int, layers: int, cache_dtype: str, rng) -> tuple:
    heads, kv_heads, head_dim, hidden, _ = SHAPES[shape]
    num_blocks = rows * width + 1
    cache_shape = (layers, num_blocks, BLOCK, kv_heads, head_dim)
    caches = [jnp.asarray(rng.standard_normal(cache_shape, np.float32)).astype(cache_dtype) for _ in range(2)]
    tables = rng.permutation(num_blocks)[: rows * width].reshape(rows, width).astype(np.int32)
    positions = np.full((rows, 1), context - 1, np.int32)
    q = rng.standard_normal((rows, 1, heads, head_dim), np.float32)
    o_proj = quantize((rng.standard_normal((hidden, heads * head_dim)) * 0.05).astype(np.float32), "U8M")
    o_proj = jax.device_put(stack([o_proj] * layers))
    return q, *caches, tables, positions, np.full(rows, context, np.int32), o_proj


def step(q, k_cache, v_cache, tables, positions, context_lens, o_proj, *, attention, layers, window):
    rows, _, heads, head_dim = q.shape

    def layer(h, i):
        a = attention(
            q + h[:, :, None, :head_dim],
            k_cache,
            v_cache,
            i,
            tables,
            positions,
            context_lens,
            scale=head_dim**-0.5,
            sliding_window=window,
            soft_cap=None,
        )
        w = jax.tree.map(lambda x: x[i], o_proj)
        return dense(a.reshape(rows, 1, heads * head_dim), w) * 1e-3, None

    hidden = o_proj.out_in[0]
    return jax.lax.scan(layer, jnp.zeros((rows, 1, hidden)), jnp.arange(layers))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["demo"], choices=list(SHAPES))
    ap.add_argument("--cases", nargs="+", default=["1:1024:80", "1:512:64", "32:128:16"])
    ap.add_argument("--cache-dtypes", nargs="+", default=["float16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:7], choices=list(VARIANTS))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_attention.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    options = STEP_XLA_OPTIONS.get("cpu")
    results: dict[str, dict] = {}
    for shape in args.shapes:
        for case in args.cases:
            rows, context, width = (int(x) for x in case.split(":"))
            for cache_dtype in args.cache_dtypes:
                inputs = case_inputs(shape, rows, context, width, args.layers, cache_dtype, rng)
                label = f"{shape}, {rows} x {context} tokens, width {width * BLOCK}, {cache_dtype}"
                calls, reference = {}, None
                for name in args.variants:
                    if name == "head_gemvs" and rows > 1:
                        continue
                    attend = functools.partial(
                        step, attention=VARIANTS[name], layers=args.layers, window=SHAPES[shape][4]
                    )
                    calls[name] = jax.jit(attend, compiler_options=options)
                    out = np.asarray(calls[name](*inputs))
                    reference = out if reference is None else reference
                    np.testing.assert_allclose(
                        out, reference, rtol=2e-3, atol=2e-4, err_msg=f"{name}, {label}"
                    )
                wall = {name: [] for name in calls}
                cpu = {name: [] for name in calls}
                for _ in range(args.repeats):
                    for name, call in calls.items():
                        began, cpu_began = time.perf_counter(), time.process_time()
                        jax.block_until_ready(call(*inputs))
                        wall[name].append(1e3 * (time.perf_counter() - began))
                        cpu[name].append(1e3 * (time.process_time() - cpu_began))
                results[label] = {
                    name: {"ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])}
                    for name in calls
                }
                print(
                    label,
                    {k: (round(v["ms"], 2), round(v["cpu_ms"], 2)) for k, v in results[label].items()},
                    flush=True,
                )
    text = markdown_table(
        ["shape, rows x context, keys read, cache", *[f"{v} ms (CPU ms)" for v in args.variants]],
        [
            [label, *[f"{r[v]['ms']:.1f} ({r[v]['cpu_ms']:.1f})" if v in r else "—" for v in args.variants]]
            for label, r in results.items()
        ],
    )
    print(f"\n{args.layers} layers of decode attention + o_proj under lax.scan, median of {args.repeats}\n")
    print(text)
    write_json(args.out, {"args": vars(args), "machine": machine_facts(), "ms": results, "table": text})


if __name__ == "__main__":
    main()
