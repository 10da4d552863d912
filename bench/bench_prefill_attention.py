"""Prompt-chunk attention over the paged KV cache on XLA:CPU: the dense form against the tiled one.

    JAX_PLATFORMS=cpu python bench/bench_prefill_attention.py [--cases 512:0:32 2048:0:128 1904:4096:512]
        [--variants dense tiled 256:512] [--layers 30] [--repeats 3]

A case is TOKENS:START:WIDTH: a chunk of TOKENS prompt tokens (padded to a power of two, as the engine
pads) on START cached ones, the block table WIDTH 16-token blocks wide (physical blocks shuffled). A
variant is `dense` (`paged_attention_xla(tiled=False)`: a [chunk x width] score matrix), `tiled` (the
op's default tiles) or QUERY_TILE:KEY_TILE. Every layer of a SmolLM2-135M shape (9 query heads, 3 KV heads,
head_dim 64) runs attention under `lax.scan`. Figures: seconds for all layers, median; `cpu s` is the
process's CPU time (both threads), steadier than the wall time on a shared machine. Every variant's
output is checked against the first one's. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_facts, markdown_table, write_json

from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.tiled_attention import tiled_paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def attention(variant: str):
    if variant == "dense":
        return functools.partial(paged_attention_xla, tiled=False)
    if variant == "tiled":
        return tiled_paged_attention
    query_tile, key_tile = (int(x) for x in variant.split(":"))
    return functools.partial(tiled_paged_attention, query_tile=query_tile, key_tile=key_tile)


def layers_of(fn, num_layers: int):
    @jax.jit
    def run(q, k_cache, v_cache, tables, positions, context_lens):
        def body(h, layer):
            return h + 0.01 * fn(
                h, k_cache, v_cache, layer, tables, positions, context_lens, scale=0.125
            ), None

        return jax.lax.scan(body, q, jnp.arange(num_layers))[0]

    return run


def timed(run, args: tuple, repeats: int) -> tuple[float, float]:
    """Median (cpu s, wall s) of `repeats` calls after a compiling one."""
    jax.block_until_ready(run(*args))
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        jax.block_until_ready(run(*args))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases", nargs="+", default=["512:0:32", "2048:0:128", "2048:2048:256", "1904:4096:512"]
    )
    ap.add_argument("--variants", nargs="+", default=["dense", "tiled"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_attention.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
    num_blocks = max(w for _, _, w in cases) + 1
    shape = (args.layers, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32))
    runs = {v: layers_of(attention(v), args.layers) for v in args.variants}
    rows, results = [], []
    for tokens, start, width in cases:
        padded = max(16, 1 << (tokens - 1).bit_length())
        positions = np.zeros((1, padded), np.int32)
        positions[0, :tokens] = np.arange(start, start + tokens)
        tables = rng.permutation(num_blocks)[:width].astype(np.int32)[None]
        q = jnp.asarray(rng.standard_normal((1, padded, HEADS, HEAD_DIM), np.float32))
        inputs = (
            q,
            k_cache,
            v_cache,
            jnp.asarray(tables),
            jnp.asarray(positions),
            jnp.int32([start + tokens]),
        )
        first = None
        for variant, run in runs.items():
            out = np.asarray(run(*inputs))[:, :tokens]
            first = out if first is None else first
            np.testing.assert_allclose(out, first, rtol=1e-4, atol=1e-4)
            cpu, wall = timed(run, inputs, args.repeats)
            case = f"{tokens} on {start}, {width * BLOCK} keys"
            rows.append([case, variant, f"{cpu:.3f}", f"{wall:.3f}"])
            results.append(
                dict(tokens=tokens, start=start, width=width, variant=variant, cpu_s=cpu, wall_s=wall)
            )
            print(" | ".join(rows[-1]), flush=True)
    print(markdown_table(["chunk", "variant", "cpu s", "wall s"], rows))
    write_json(
        args.out,
        {"args": vars(args) | {"out": str(args.out)}, "machine": machine_facts(), "results": results},
    )


if __name__ == "__main__":
    main()
