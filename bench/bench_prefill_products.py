"""A prompt chunk's layer products on XLA:CPU: the engine's form against other operand forms, interleaved.

    JAX_PLATFORMS=cpu python bench/bench_prefill_products.py [--rows 512] [--shapes demo gemma3 qwen05]
        [--repeats 7]

Each distinct MLP shape of SmolLM2-135M, Gemma-3-270M and Qwen2.5-Coder-0.5B (random codes, in the format
the engine holds it in on CPU: Q8F for gate/up, U8M for down; the demo's Q4_1 both U8M) times `--rows` rows
of activations, as:

- nt: the engine's `qmatmul_xla` (W dequantized as stored, [out, in], then `x @ W.T`);
- nt_bf16: the same with bfloat16 operands (`gemm_dtype`, the `xla_bf16` kernel a CPU with bfloat16 dot
  instructions takes for prefill: `jaxrs.engine.matmul_dtype`);
- nn: W dequantized straight into [in, out] (from codes and scales stored transposed), then `x @ W`;
- nt_materialized / nn_materialized: W dequantized and written out whole first (an optimization barrier),
  then the product, in each layout;
- dequantize / dequantize_t: the dequantization alone, as stored and transposed;
- int8: the int8 x int8 -> int32 dot of the codes with the activations rounded to int8 (a rate only: the
  weights' per-32 scales along `in` do not fit inside one such dot).

All variants of a shape are compiled, then called in turn `--repeats` times. Medians of wall and process CPU
time (both threads) in ms, and GFLOP per CPU second of the product. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import RESULTS, markdown_table, write_results
from jax import lax

from pallas_kernels.dequant import dequantize_packed
from pallas_kernels.qmatmul import qmatmul_xla

SHAPES = {  # name: [(matrix, out, in, format on CPU)]
    "demo": [("gate/up", 1536, 576, "U8M"), ("down", 576, 1536, "U8M")],
    "gemma3": [("gate/up", 2048, 640, "Q8F"), ("down", 640, 2048, "U8M")],
    "qwen05": [("gate/up", 4864, 896, "Q8F"), ("down", 896, 4864, "U8M")],
}


def packed(rng: np.random.Generator, fmt: str, out_features: int, in_features: int) -> dict[str, jax.Array]:
    """Random fields of a Q8F or U8M weight `[out, in]`."""
    blocks = (out_features, in_features // 32)
    if fmt == "Q8F":
        codes = rng.integers(-127, 128, (out_features, in_features), dtype=np.int8)
    else:
        codes = rng.integers(0, 256, (out_features, in_features), dtype=np.uint8)
    arrays = {"qs": codes, "d": rng.random(blocks, np.float32) * 0.01}
    if fmt == "U8M":
        arrays["m"] = rng.random(blocks, np.float32) * -0.01
    return {name: jnp.asarray(a) for name, a in arrays.items()}


def dequantize_transposed(fields_t: dict[str, jax.Array], fmt: str) -> jax.Array:
    """W.T `[in, out]` from fields stored transposed (codes `[in, out]`, scales `[in / 32, out]`)."""
    codes = fields_t["qs"]
    in_features, out_features = codes.shape
    w = codes.reshape(in_features // 32, 32, out_features).astype(jnp.float32) * fields_t["d"][:, None, :]
    if fmt == "U8M":
        w = w + fields_t["m"][:, None, :]
    return w.reshape(in_features, out_features)


def variants(fmt: str, out_in: tuple[int, int]) -> dict[str, Callable]:
    def dequantize(a):
        return dequantize_packed(a, fmt=fmt, out_in=out_in)

    def product(x, w):
        return jnp.matmul(x, w, preferred_element_type=jnp.float32)

    def int8(x, a):
        xq = jnp.clip(jnp.round(x * 20), -127, 127).astype(jnp.int8)
        dims = (((1,), (1,)), ((), ()))
        return lax.dot_general(xq, a["qs"].astype(jnp.int8), dims, preferred_element_type=jnp.int32)

    return {
        "nt": lambda x, a, at: qmatmul_xla(x, a, fmt=fmt, out_in=out_in),
        "nt_bf16": lambda x, a, at: qmatmul_xla(x, a, fmt=fmt, out_in=out_in, gemm_dtype=jnp.bfloat16),
        "nn": lambda x, a, at: product(x, dequantize_transposed(at, fmt)),
        "nt_materialized": lambda x, a, at: product(x, lax.optimization_barrier(dequantize(a)).T),
        "nn_materialized": lambda x, a, at: product(x, lax.optimization_barrier(dequantize(a).T)),
        "dequantize": lambda x, a, at: dequantize(a),
        "dequantize_t": lambda x, a, at: dequantize(a).T,
        "int8": lambda x, a, at: int8(x, a),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "prefill_products.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, results = [], []
    for model in args.shapes:
        for matrix, out_features, in_features, fmt in SHAPES[model]:
            a = packed(rng, fmt, out_features, in_features)
            at = {name: v.T for name, v in a.items()}
            x = jnp.asarray(rng.standard_normal((args.rows, in_features), np.float32))
            calls = {name: jax.jit(fn) for name, fn in variants(fmt, (out_features, in_features)).items()}
            for call in calls.values():
                jax.block_until_ready(call(x, a, at))
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    jax.block_until_ready(call(x, a, at))
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            flop = 2 * args.rows * out_features * in_features
            shape = f"{model} {matrix} [{args.rows}, {in_features}] x [{in_features}, {out_features}] {fmt}"
            for name, ts in times.items():
                wall = statistics.median(w for w, _ in ts)
                cpu = statistics.median(c for _, c in ts)
                rate = "" if name.startswith("dequantize") else f"{flop / cpu / 1e9:.0f}"
                rows.append([shape, name, f"{1e3 * wall:.2f}", f"{1e3 * cpu:.2f}", rate])
                results.append(dict(shape=shape, variant=name, wall_ms=1e3 * wall, cpu_ms=1e3 * cpu))
                print(" | ".join(rows[-1]), flush=True)
    print(markdown_table(["shape", "variant", "wall ms", "cpu ms", "GFLOP per CPU s"], rows))
    write_results(args, results)


if __name__ == "__main__":
    main()
