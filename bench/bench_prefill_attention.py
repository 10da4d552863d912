"""Prompt-chunk attention over the paged KV cache on XLA:CPU: the dense form against the tiled one.

    JAX_PLATFORMS=cpu python bench/bench_prefill_attention.py [--cases 512:0:32 2048:0:128 1904:4096:512]
        [--variants dense tiled 256:512] [--layers 30] [--repeats 3] [--heads smollm|gemma3|qwen05]
        [--window N] [--kv-cache-dtype float16]

A case is TOKENS:START:WIDTH: a chunk of TOKENS prompt tokens (padded to a power of two, as the engine
pads) on START cached ones, the block table WIDTH 16-token blocks wide (physical blocks shuffled). A
variant is `dense` (`paged_attention_xla(tiled=False)`: a [chunk x width] score matrix), `tiled` (the
op's default tiles) or QUERY_TILE:KEY_TILE. Every layer runs attention under `lax.scan`, with the heads of
`--heads` (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64; Gemma-3-270M: 4, 1, 256;
Qwen2.5-0.5B: 14, 2, 64), a sliding window of `--window` keys if given, the cache in `--kv-cache-dtype`.
The variants run interleaved, call by call. Figures: seconds for all layers, median; `cpu s` is the
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
from common import markdown_table, write_results

from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.tiled_attention import tiled_paged_attention

BLOCK = 16
HEADS = {"smollm": (9, 3, 64), "gemma3": (4, 1, 256), "qwen05": (14, 2, 64)}  # query heads, KV heads, dim


def attention(variant: str):
    if variant == "dense":
        return functools.partial(paged_attention_xla, tiled=False)
    if variant == "tiled":
        return tiled_paged_attention
    query_tile, key_tile = (int(x) for x in variant.split(":"))
    return functools.partial(tiled_paged_attention, query_tile=query_tile, key_tile=key_tile)


def layers_of(fn, num_layers: int, window: int | None):
    @jax.jit
    def run(q, k_cache, v_cache, tables, positions, context_lens):
        def body(h, layer):
            return h + 0.01 * fn(
                h,
                k_cache,
                v_cache,
                layer,
                tables,
                positions,
                context_lens,
                scale=0.125,
                sliding_window=window,
            ), None

        return jax.lax.scan(body, q, jnp.arange(num_layers))[0]

    return run


def timed(runs: dict, args: tuple, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (cpu s, wall s) of `repeats` calls of each run, interleaved call by call."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            c, w = time.process_time(), time.perf_counter()
            jax.block_until_ready(run(*args))
            times[name].append((time.process_time() - c, time.perf_counter() - w))
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases", nargs="+", default=["512:0:32", "2048:0:128", "2048:2048:256", "1904:4096:512"]
    )
    ap.add_argument("--variants", nargs="+", default=["dense", "tiled"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", choices=list(HEADS), default="smollm", help="the model whose heads to take")
    ap.add_argument("--window", type=int, default=None, help="sliding window (keys), if any")
    ap.add_argument("--kv-cache-dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_attention.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
    num_blocks = max(w for _, _, w in cases) + 1
    heads, kv_heads, head_dim = HEADS[args.heads]
    shape = (args.layers, num_blocks, BLOCK, kv_heads, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape, np.float32), args.kv_cache_dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape, np.float32), args.kv_cache_dtype)
    runs = {v: layers_of(attention(v), args.layers, args.window) for v in args.variants}
    rows, results = [], []
    for tokens, start, width in cases:
        padded = max(16, 1 << (tokens - 1).bit_length())
        positions = np.zeros((1, padded), np.int32)
        positions[0, :tokens] = np.arange(start, start + tokens)
        tables = rng.permutation(num_blocks)[:width].astype(np.int32)[None]
        q = jnp.asarray(rng.standard_normal((1, padded, heads, head_dim), np.float32))
        inputs = (
            q,
            k_cache,
            v_cache,
            jnp.asarray(tables),
            jnp.asarray(positions),
            jnp.int32([start + tokens]),
        )
        first = None
        for run in runs.values():  # compiles, and checks each variant against the first
            out = np.asarray(run(*inputs))[:, :tokens]
            first = out if first is None else first
            np.testing.assert_allclose(out, first, rtol=1e-4, atol=1e-4)
        for variant, (cpu, wall) in timed(runs, inputs, args.repeats).items():
            case = f"{tokens} on {start}, {width * BLOCK} keys"
            rows.append([case, variant, f"{cpu:.3f}", f"{wall:.3f}"])
            results.append(
                dict(tokens=tokens, start=start, width=width, variant=variant, cpu_s=cpu, wall_s=wall)
            )
            print(" | ".join(rows[-1]), flush=True)
    print(markdown_table(["chunk", "variant", "cpu s", "wall s"], rows))
    write_results(args, results)


if __name__ == "__main__":
    main()
