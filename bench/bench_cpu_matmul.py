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
from jaxrs.models.layers import dense
from jaxrs.quant import QuantizedTensor, dequantize, quantize, stack

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
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_matmul.json")
    args = ap.parse_args()
    options = parse_pairs(args.xla_option, "--xla-option", "NAME=VALUE") or None
    rng = np.random.default_rng(0)
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
