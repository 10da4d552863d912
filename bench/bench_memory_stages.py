"""Where a jaxrs process's resident memory goes, stage by stage: after the imports, after the model is loaded,
when the engine is ready, after serving (bench_memory.py's requests). Also the seconds to each stage.

    python bench/bench_memory_stages.py [MODEL] [--kv-tokens 1024] [--requests 4] [--new-tokens 32]

One process; each stage prints VmRSS (now) and VmHWM (the peak so far) in MiB, so the stage where the peak
was reached is the first whose VmHWM equals the final one. PYTHONPATH=CHECKOUT measures another checkout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BEGAN = time.perf_counter()


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stage(name: str, rows: list[dict]) -> None:
    row = {
        "stage": name,
        "s": round(time.perf_counter() - BEGAN, 2),
        "rss_mib": round(status_mib("VmRSS")),
        "peak_mib": round(status_mib("VmHWM")),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = Path.home() / ".cache/jaxrs/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ap.add_argument("model", nargs="?", default=str(demo))
    ap.add_argument("--kv-tokens", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    rows: list[dict] = []
    stage("python", rows)
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    stage("bare jax", rows)
    import jaxrs.llm
    from jaxrs import LLM, SamplingParams

    stage("jaxrs imported", rows)
    load = jaxrs.llm.load_model

    def load_and_note(*a, **k):
        loaded = load(*a, **k)
        stage("loaded", rows)
        return loaded

    jaxrs.llm.load_model = load_and_note
    llm = LLM(
        args.model, kv_cache_tokens=args.kv_tokens, max_model_len=args.kv_tokens, max_num_seqs=args.requests
    )
    stage("engine ready", rows)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The primary colors are"]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[: args.requests], params, use_tqdm=False)
    stage("served", rows)


if __name__ == "__main__":
    main()
