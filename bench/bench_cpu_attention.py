"""Decode attention over the paged KV cache on XLA:CPU: the formulations compared, per cache dtype.

    JAX_PLATFORMS=cpu python bench/bench_cpu_attention.py [--cases 1:640:64 32:80:16 32:80:8]
        [--cache-dtypes float32 float16] [--layers 30] [--repeats 8]

A case is ROWS:CONTEXT:WIDTH: ROWS sequences, each CONTEXT tokens long, with block tables WIDTH blocks
wide (16-token blocks, physical blocks shuffled), one query token each. Every layer of a SmolLM2-135M
shape (9 query heads, 3 KV heads, head_dim 64) runs attention then o_proj (576x576 in U8M, the packed CPU
layout) under `lax.scan`, as a decode step does: o_proj is kept because how attention writes its output
decides how o_proj's GEMV reads it. Columns (ms per step, all layers, median):

- jaxrs: `paged_attention_xla` (scores a dot, the weighted sum of values as products and sums);
- dots: scores and weighted sum both dots, the multi-row form before;
- products: both as products and sums, the one-row form before.

Every variant's output is checked against jaxrs's before timing. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import fmt as fmt_ms
from common import machine_facts, markdown_table, median_ms, write_json

from jaxrs.models.layers import dense
from jaxrs.quant import quantize, stack
from pallas_kernels.paged_attention import NEG_INF, paged_attention_xla

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK = 9, 3, 64, 576, 16


def formulated(scores_as_dot: bool, values_as_dot: bool):
    """Decode attention (one query token) with each product written as a dot or as products and sums."""

    def attention(q, k_cache, v_cache, layer, tables, positions, context_lens, *, scale):
        batch = q.shape[0]
        k = k_cache[layer, tables].reshape(batch, -1, KV_HEADS, HEAD_DIM).astype(jnp.float32)
        v = v_cache[layer, tables].reshape(batch, -1, KV_HEADS, HEAD_DIM).astype(jnp.float32)
        qg = q.reshape(batch, 1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        if scores_as_dot:
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, k)
        else:
            scores = jnp.sum(qg[:, :, None] * k[:, None, :, :, None], axis=-1).transpose(0, 3, 4, 1, 2)
        key_pos = jnp.arange(k.shape[1])[None, None, :]
        mask = (key_pos <= positions[:, :, None]) & (key_pos < context_lens[:, None, None])
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores * scale, NEG_INF), axis=-1)
        if values_as_dot:
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        else:
            out = jnp.sum(probs.transpose(0, 3, 4, 1, 2)[..., None] * v[:, None, :, :, None], axis=2)
        return out.reshape(batch, 1, HEADS, HEAD_DIM)

    return attention


VARIANTS = {
    "jaxrs": paged_attention_xla,
    "dots": formulated(True, True),
    "products": formulated(False, False),
}


def case_inputs(rows: int, context: int, width: int, layers: int, cache_dtype: str, rng) -> tuple:
    num_blocks = rows * width + 1
    shape = (layers, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [jnp.asarray(rng.standard_normal(shape, np.float32)).astype(cache_dtype) for _ in range(2)]
    tables = rng.permutation(num_blocks)[: rows * width].reshape(rows, width).astype(np.int32)
    positions = np.full((rows, 1), context - 1, np.int32)
    q = rng.standard_normal((rows, 1, HEADS, HEAD_DIM), np.float32)
    o_proj = quantize((rng.standard_normal((HIDDEN, HIDDEN)) * 0.05).astype(np.float32), "U8M")
    o_proj = jax.device_put(stack([o_proj] * layers))
    return q, *caches, tables, positions, np.full(rows, context, np.int32), o_proj


def step(q, k_cache, v_cache, tables, positions, context_lens, o_proj, *, attention, layers):
    def layer(h, i):
        a = attention(
            q + h[:, :, None, :HEAD_DIM], k_cache, v_cache, i, tables, positions, context_lens, scale=0.125
        )
        w = jax.tree.map(lambda x: x[i], o_proj)
        return dense(a.reshape(h.shape), w) * 1e-3, None

    return jax.lax.scan(layer, jnp.zeros((q.shape[0], 1, HIDDEN)), jnp.arange(layers))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["1:640:64", "1:640:48", "32:80:16", "32:80:8"])
    ap.add_argument("--cache-dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_attention.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, dict] = {}
    for case in args.cases:
        rows, context, width = (int(x) for x in case.split(":"))
        for cache_dtype in args.cache_dtypes:
            inputs = case_inputs(rows, context, width, args.layers, cache_dtype, rng)
            label = f"{rows} x {context} tokens, width {width * BLOCK}, {cache_dtype}"
            results[label] = {}
            reference = None
            for name, attention in VARIANTS.items():
                fn = jax.jit(functools.partial(step, attention=attention, layers=args.layers))
                out = np.asarray(fn(*inputs))
                reference = out if reference is None else reference
                np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4, err_msg=f"{name}, {label}")
                results[label][name] = median_ms(fn, *inputs, repeats=args.repeats)
            print(label, {k: round(v, 2) for k, v in results[label].items()}, flush=True)
    text = markdown_table(
        ["rows x context, keys read, cache", *[f"{v} ms" for v in VARIANTS]],
        [[label, *[fmt_ms(row[v]) for v in VARIANTS]] for label, row in results.items()],
    )
    print(f"\n{args.layers} layers of decode attention + o_proj under lax.scan, median of {args.repeats}\n")
    print(text)
    write_json(args.out, {"args": vars(args), "machine": machine_facts(), "ms": results, "table": text})


if __name__ == "__main__":
    main()
