"""Whether XLA:CPU has a fast int8 product: an int8 x int8 -> int32 `dot_general` against the fused f32
GEMV of a byte-code (Q8F) weight, one row, under each library-fusion setting this jaxlib offers.

    JAX_PLATFORMS=cpu python bench/bench_cpu_int8.py [--shapes 4864x896 151936x896] [--repeats 15]
        [--settings default ...]

llama.cpp's decode runs int8 block dots (VNNI where the CPU has it) on 4.5-8.5 bits a weight; the
engine's packed products on CPU dequantize one byte a weight into a fused f32 GEMV. If XLA lowered an int8
`dot_general` to a VNNI kernel, quantizing the activations to int8 would be a lever; the table says whether
it does. Each setting runs in its own process (XLA reads its flags once), `XLA_FLAGS` as listed.
Medians and minima in ms; prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import markdown_table, write_json

SETTINGS = {
    "default": "",
    "oneDNN custom call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "YNNPACK dot fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot",
}


def measure(out: int, inp: int, repeats: int) -> dict:
    """This process's timings of the two products at one shape (run in a child with its XLA_FLAGS)."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(-127, 127, (out, inp), dtype=np.int8))
    scales = jnp.asarray(rng.random((out, inp // 32), dtype=np.float32))
    x8 = jnp.asarray(rng.integers(-127, 127, (1, inp), dtype=np.int8))
    xf = jnp.asarray(rng.random((1, inp), dtype=np.float32))

    @jax.jit
    def int8_dot(x, w):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    @jax.jit
    def f32_gemv(x, w, s):  # the Q8F product as the engine writes it: dequantize, then one-row matmul
        return x @ (w.reshape(out, inp // 32, 32).astype(jnp.float32) * s[..., None]).reshape(out, inp).T

    def times(fn, *args) -> list[float]:
        jax.block_until_ready(fn(*args))
        found = []
        for _ in range(repeats):
            began = time.perf_counter()
            jax.block_until_ready(fn(*args))
            found.append(1000 * (time.perf_counter() - began))
        return found

    return {"int8_dot": times(int8_dot, x8, codes), "f32_gemv": times(f32_gemv, xf, codes, scales)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4864x896", "151936x896"], help="OUTxIN")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_int8.json")
    args = ap.parse_args()
    if args.child:
        out, inp = map(int, args.child.split("x"))
        print(json.dumps(measure(out, inp, args.repeats)))
        return
    rows, found = [], []
    for shape in args.shapes:
        for name in args.settings:
            flags = SETTINGS[name]
            env = os.environ | {"XLA_FLAGS": flags}
            cmd = [sys.executable, __file__, "--child", shape, "--repeats", str(args.repeats)]
            result = json.loads(
                subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            )
            found.append({"shape": shape, "setting": name, "xla_flags": flags, **result})
            i8, f32 = sorted(result["int8_dot"]), sorted(result["f32_gemv"])
            mid = len(i8) // 2
            rows.append(
                [
                    shape,
                    name,
                    f"{i8[mid]:.2f} ({i8[0]:.2f})",
                    f"{f32[mid]:.2f} ({f32[0]:.2f})",
                    f"{i8[0] / f32[0]:.1f}x",
                ]
            )
            print(rows[-1], flush=True)
    print(
        markdown_table(
            ["W out x in", "XLA setting", "int8 dot ms (min)", "f32 GEMV ms (min)", "int8 / f32"], rows
        )
    )
    write_json(args.out, {"rows": found})


if __name__ == "__main__":
    main()
