"""One model load in a fresh process: its wall and CPU seconds and the process's peak resident memory.

    python bench/bench_load.py MODEL      # prints one JSON line

The JAX runtime is started (import jax, one jitted op) before the clock, so the figures are the load's:
`peak_mib` is VmHWM after `load_model` (the runtime's own peak is `peak_before`). Run it from a checkout's
directory with PYTHONPATH=CHECKOUT to measure that checkout; interleave checkouts on a shared machine.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    from jaxrs.loading import load_model

    before, cpu, wall = peak_mib(), cpu_seconds(), time.perf_counter()
    load_model(sys.argv[1])
    row = {
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(cpu_seconds() - cpu, 2),
        "peak_before": before,
        "peak_mib": peak_mib(),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
