"""Cost of the on-device sampler by profile and batch size, against a full-vocabulary argsort.

    python bench/bench_sampler.py [--vocab 49152] [--rows 1 8 32]

Prints a table of medians (ms per call) and writes bench/results/sampler.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from common import median_ms

from jaxrs.engine.sampling import SamplingParams, build_sampling_batch, sample

PROFILES = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=0.8),
    "top-k 50 + top-p 0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    "greedy + min_tokens": SamplingParams(temperature=0, min_tokens=8, eos_token_ids=(0, 2)),
    "greedy + 64 allowed ids": SamplingParams(temperature=0, allowed_token_ids=list(range(64))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler.json")
    args = ap.parse_args()
    run = jax.jit(sample, static_argnames="flags")
    argsort = jax.jit(lambda x: jnp.argsort(-x, axis=-1))
    table = {}
    for rows in args.rows:
        logits = jax.random.normal(jax.random.key(0), (rows, args.vocab)) * 4
        table[rows] = {"full argsort (peer)": median_ms(argsort, logits, repeats=7)}
        for name, params in PROFILES.items():
            batch, flags = build_sampling_batch(
                [params] * rows, list(range(rows)), [0] * rows, [[1]] * rows, [[]] * rows, rows, args.vocab
            )
            table[rows][name] = median_ms(run, logits, batch, flags, repeats=7)
    columns = list(next(iter(table.values())))
    print(f"\nms per call (median of 7), vocabulary {args.vocab}, {jax.default_backend()}")
    print("| rows | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for rows, row in table.items():
        print(f"| {rows} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"vocab": args.vocab, "backend": jax.default_backend(), "ms": table}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
