"""What the yielding bans cost: the sampler with min_tokens bans that yield where they would leave a row
nothing to draw (`sampling.apply_token_limits`) against the bans as they were (applied whatever they
leave), interleaved in one process.

    python bench/bench_token_limits.py [--vocab 49152] [--rows 1 8 32]

Prints wall and CPU milliseconds per sampler call, medians of 9 rounds of 20 calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrs.engine import sampling
from jaxrs.engine.sampling import SamplingParams, build_sampling_batch


def plain_bans(logits: jax.Array, batch: dict, flags: sampling.SamplingFlags) -> jax.Array:
    """The stage before bans yielded: an all -inf row drew token 0."""
    rows = jnp.arange(logits.shape[0])[:, None]
    active = batch["step"][:, None] < batch["ban_until"]
    return logits.at[rows, batch["ban_ids"]].min(jnp.where(active, -jnp.inf, jnp.inf), mode="drop")


def sampler_with(limits: Callable[..., jax.Array]) -> Callable[..., sampling.SampleOutput]:
    """`sampling.sample` traced with `limits` as its token-limit stage."""
    current = sampling.apply_token_limits

    def run(logits: jax.Array, batch: dict, flags: sampling.SamplingFlags) -> sampling.SampleOutput:
        sampling.apply_token_limits = limits
        try:
            return sampling.sample(logits, batch, flags)
        finally:
            sampling.apply_token_limits = current

    return jax.jit(run, static_argnames="flags")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    variants = {
        "plain bans": sampler_with(plain_bans),
        "yielding bans": sampler_with(sampling.apply_token_limits),
    }
    params = SamplingParams(temperature=0, min_tokens=8, eos_token_ids=(0, 2))
    print(f"| rows | {' | '.join(f'{k} ms (CPU ms)' for k in variants)} |\n|---|---|---|")
    for rows in args.rows:
        batch, flags = build_sampling_batch(
            [params] * rows, list(range(rows)), [0] * rows, [[1]] * rows, [[]] * rows, rows, args.vocab
        )
        logits = jax.random.normal(jax.random.key(0), (rows, args.vocab)) * 4
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for f in variants.values():
            f(logits, batch, flags).tokens.block_until_ready()
        for _ in range(9):
            for name, f in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(20):
                    f(logits, batch, flags).tokens.block_until_ready()
                wall[name].append((time.perf_counter() - t0) / 20 * 1e3)
                cpu[name].append((time.process_time() - c0) / 20 * 1e3)
        cells = [f"{statistics.median(wall[k]):.2f} ({statistics.median(cpu[k]):.2f})" for k in variants]
        print(f"| {rows} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
