"""The layer matmuls of a decode step on XLA:CPU: each weight format, and the formulations compared.

    JAX_PLATFORMS=cpu python bench/bench_cpu_matmul.py [--rows 1 32] [--layers 30] [--repeats 8]
        [--xla-option NAME=VALUE ...]

A stack of `--layers` SmolLM2-135M layers' projection matrices (q 576x576, k and v 192x576, o 576x576,
gate and up 1536x576, down 576x1536; random values) runs under `lax.scan` as a decode step does, at
`--rows` rows of activations. Columns:

- jaxrs: the model's `dense` (for packed weights the `qmatmul` op's XLA implementation);
- einsum: the same dequantize-then-dot written `einsum("...i,oi->...o")`, the previous formulation;
- fused: `dense` over q/k/v and gate/up concatenated along `out` (one matmul per group), float only.

Medians in ms per step (all layers). `--xla-option` compiles every variant with that XLA option (as
`EngineConfig.xla_options` does the engine's steps). Prints a table and writes JSON (--out).

    JAX_PLATFORMS=cpu python bench/bench_cpu_matmul.py --few-rows [--models demo qwen05]
        [--rows 1 2 3 5 9 17 33] [--formats ...] [--repeats 9]

`--few-rows`: one packed matrix at a time, each distinct shape of the demo model's and Qwen2.5-Coder-0.5B's
layers and their head (random values), in the format the engine holds it in on CPU (or each of
`--formats` where the shape allows it), at each `--rows`: the `qmatmul` op's XLA implementation with its
few-row path ("tiles") against the same with that path off ("whole": W dequantized whole, then one
product), interleaved call by call; medians in ms.
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

from jaxrs.cli import parse_pairs
from jaxrs.models.head_slices import head_in_slices
from jaxrs.models.layers import dense
from jaxrs.ops import qmatmul_xla
from jaxrs.quant import QuantizedTensor, dequantize, quantize, stack
from pallas_kernels import qmatmul

SHAPES = {  # out, in
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
# K-quants need `in` % 256 == 0, which these shapes (576) are not
FORMATS = ["F32", "F16", "Q8_0", "Q8F", "U8M", "Q4_0", "Q4_1", "Q5_0"]


# name -> (out, in), the format the engine holds it in on CPU (`transcode.cpu_layout` of the file's)
FEW_ROW_SHAPES = {
    "demo": {  # SmolLM2-135M Q4_1, head the tied Q8_0 embedding
        "q_proj/o_proj": ((576, 576), "U8M"),
        "k_proj/v_proj": ((192, 576), "U8M"),
        "gate_proj/up_proj": ((1536, 576), "U8M"),
        "down_proj": ((576, 1536), "U8M"),
        "head": ((49152, 576), "Q8F"),
    },
    "qwen05": {  # Qwen2.5-Coder-0.5B Q4_K_M: Q5_0 projections, Q4_K/Q6_K down, Q8_0 head
        "q_proj/o_proj": ((896, 896), "Q8F"),
        "k_proj/v_proj": ((128, 896), "Q8F"),
        "gate_proj/up_proj": ((4864, 896), "Q8F"),
        "down_proj": ((896, 4864), "U8M"),
        "down_proj Q6_K": ((896, 4864), "Q6_K"),
        "head": ((151936, 896), "Q8F"),
    },
}


def few_rows(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """The `--few-rows` table: whole vs tiles per (model, matrix, format, rows)."""
    from jaxrs.quant.formats import FORMATS as SPECS

    def product(x, w):
        return head_in_slices(qmatmul_xla, x, w) if w.out_in[0] > 100_000 else qmatmul_xla(x, w)

    def timed(fn, x, w, few: bool) -> float:
        qmatmul.CPU_FEW_ROWS = default_few if few else 1  # read when the function is traced
        return median_ms(fn, x, w, repeats=1)

    default_few = qmatmul.CPU_FEW_ROWS
    rows_out, results = [], {}
    for model in args.models:
        seen = set()
        for name, ((out, inp), engine_fmt) in FEW_ROW_SHAPES[model].items():
            fmts = args.formats if args.formats != FORMATS else [engine_fmt]
            if fmts == args.formats and (out, inp) in seen:
                continue
            seen.add((out, inp))
            for fmt in fmts:
                if inp % SPECS[fmt].block:
                    continue
                w = jax.device_put(quantize((rng.standard_normal((out, inp)) * 0.05).astype(np.float32), fmt))
                for rows in args.rows:
                    x = jnp.asarray(rng.standard_normal((rows, inp)).astype(np.float32))
                    fns = {few: jax.jit(lambda x, w: product(x, w)) for few in (False, True)}  # two traces
                    times = {False: [], True: []}
                    for few in (False, True):
                        timed(fns[few], x, w, few)  # compiles
                    for _ in range(args.repeats):
                        for few in (False, True):
                            times[few].append(timed(fns[few], x, w, few))
                    whole, tiles = (float(np.median(times[f])) for f in (False, True))
                    key = f"{model} {name} {fmt} @{rows}"
                    results[key] = {"whole": whole, "tiles": tiles}
                    rows_out.append(
                        [
                            model,
                            name,
                            f"{out}x{inp}",
                            fmt,
                            rows,
                            fmt_ms(whole),
                            fmt_ms(tiles),
                            f"{whole / tiles:.2f}x",
                        ]
                    )
                    print(key, {k: round(v, 2) for k, v in results[key].items()}, flush=True)
    qmatmul.CPU_FEW_ROWS = default_few
    text = markdown_table(
        ["model", "matrix", "out x in", "format", "rows", "whole ms", "tiles ms", "speed-up"], rows_out
    )
    print(f"\nOne packed matrix, median of {args.repeats} interleaved calls\n")
    print(text)
    write_json(args.out, {"args": vars(args), "machine": machine_facts(), "ms": results, "table": text})


def layers(fmt: str, count: int, rng: np.random.Generator) -> dict:
    """One random layer's matrices in `fmt`, stacked `count` times (the values repeat; the bytes do not
    matter to the timing)."""
    out = {}
    for name, shape in SHAPES.items():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if fmt == "F32":
            out[name] = jnp.asarray(np.broadcast_to(w, (count, *shape)))
        else:
            out[name] = jax.device_put(stack([quantize(w, fmt)] * count))
    return out


def fused(params: dict) -> dict | None:
    """q/k/v and gate/up concatenated along `out` (float weights only)."""
    if any(isinstance(w, QuantizedTensor) for w in params.values()):
        return None
    cat = lambda *names: jnp.concatenate([params[n] for n in names], axis=-2)  # noqa: E731
    rest = {k: params[k] for k in ("o_proj", "down_proj")}
    return rest | {"qkv_proj": cat("q_proj", "k_proj", "v_proj"), "gate_up_proj": cat("gate_proj", "up_proj")}


def einsum_dense(x: jax.Array, w) -> jax.Array:
    w = dequantize(w, x.dtype) if isinstance(w, QuantizedTensor) else w
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def step(x: jax.Array, params: dict, matmul) -> jax.Array:
    """The projections of every layer in turn (attention and norms left out)."""

    def layer(h, lp):
        if "qkv_proj" in lp:
            q = matmul(h, lp["qkv_proj"])[..., :576]
        else:
            q = matmul(h, lp["q_proj"]) + matmul(h, lp["k_proj"]).sum() + matmul(h, lp["v_proj"]).sum()
        a = matmul(jnp.tanh(q), lp["o_proj"])
        if "gate_up_proj" in lp:
            gate, up = jnp.split(matmul(h + a, lp["gate_up_proj"]), 2, axis=-1)
        else:
            gate, up = matmul(h + a, lp["gate_proj"]), matmul(h + a, lp["up_proj"])
        return h + matmul(jax.nn.silu(gate) * up, lp["down_proj"]), None

    return jax.lax.scan(layer, x, params)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--few-rows", action="store_true", help="the few-row table (see above)")
    ap.add_argument("--models", nargs="+", default=list(FEW_ROW_SHAPES), choices=list(FEW_ROW_SHAPES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_matmul.json")
    args = ap.parse_args()
    options = parse_pairs(args.xla_option, "--xla-option", "NAME=VALUE") or None
    rng = np.random.default_rng(0)
    if args.few_rows:
        if args.out == ap.get_default("out"):
            args.out = args.out.with_name("cpu_matmul_few_rows.json")
        return few_rows(args, rng)
    results: dict[str, dict] = {}
    for fmt in args.formats:
        params = layers(fmt, args.layers, rng)
        variants = {
            "jaxrs": (params, dense),
            "einsum": (params, einsum_dense),
            "fused": (fused(params), dense),
        }
        results[fmt] = {}
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, 1, 576)).astype(np.float32))
            for label, (tree, matmul) in variants.items():
                fn = jax.jit(functools.partial(step, matmul=matmul), compiler_options=options)
                ms = None if tree is None else median_ms(fn, x, tree, repeats=args.repeats)
                results[fmt][f"{label} @{rows}"] = ms
        print(fmt, {k: v and round(v, 2) for k, v in results[fmt].items()}, flush=True)
    columns = list(next(iter(results.values())))
    text = markdown_table(
        ["format", *[f"{c} ms" for c in columns]],
        [[fmt, *[fmt_ms(row[c]) for c in columns]] for fmt, row in results.items()],
    )
    print(f"\n{args.layers} layers of SmolLM2-135M projections under lax.scan, median of {args.repeats}\n")
    print(text)
    write_json(args.out, {"args": vars(args), "machine": machine_facts(), "ms": results, "table": text})


if __name__ == "__main__":
    main()
