"""Tensor and data parallelism on simulated CPU devices: aggregate throughput and the collectives in
the decode step, at TP 1/2/4 and DP 1/2.

    python bench/bench_parallel.py [--configs 1x1 2x1 4x1 1x2] [--requests 16] [--tokens 32]

The simulated devices (`--xla_force_host_platform_device_count`, set here before JAX starts) share
this machine's cores, so the figures check that splitting the model keeps working and what it costs
in overhead, not a speed-up: a real speed-up needs real devices. A random Llama-shaped model (16
heads, 4 KV heads, 8 layers, hidden 1024, vocabulary 8192; built with transformers, float32) serves
`--requests` greedy requests of `--tokens` tokens at once through the server's driver (`drive`: one
engine, or a router over replicas), after one untimed round; passes alternate between configurations.
Also reports the collectives XLA put in the compiled decode step (all-reduce, all-gather, ...).
Writes bench/results/parallel.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine_facts, markdown_table, write_json

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def build_model(folder: Path) -> None:
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    save_tiny_hf_model(config, folder)
    save_tiny_tokenizer(folder, config.vocab_size)


def collectives(llm) -> dict[str, int]:
    """Collective ops in the compiled decode steps' HLO (per step call, summed over its executables)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for key, entry in llm.engine.runner.compiled._entries.items():
        if key[0] != "decode" or not entry.done():
            continue
        text = entry.result().as_text()
        for op in COLLECTIVES:
            counts[op] += len(re.findall(rf"= \S+ {op}(-start)?\(", text))
    return counts


async def serve(driver, prompts, params) -> int:
    import asyncio

    async def one(p):
        tokens = 0
        async for update in driver.generate(p, params):
            tokens += sum(len(u.token_ids) for u in update.updates)
        return tokens

    return sum(await asyncio.gather(*(one(p) for p in prompts)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["1x1", "2x1", "4x1", "1x2"], help="TPxDP")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "parallel.json")
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in c.split("x")) for c in args.configs]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={max(tp * dp for tp, dp in sizes)}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import asyncio

    from jaxrs import LLM, SamplingParams
    from jaxrs.parallel.data_parallel import drive

    folder = Path(tempfile.mkdtemp()) / "llama"
    build_model(folder)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompts = [[3 + (11 * i + j) % 8000 for j in range(24)] for i in range(args.requests)]
    engine = dict(
        kv_cache_tokens=4096, max_num_seqs=args.requests, max_model_len=256, kv_cache_dtype="float32"
    )
    runs = {}
    for tp, dp in sizes:
        llm = LLM(str(folder), dtype="float32", tensor_parallel_size=tp, data_parallel_size=dp, **engine)
        runs[(tp, dp)] = {"llm": llm, "times": []}

    async def timed(llm) -> tuple[float, int]:
        driver = drive(llm.replicas)
        try:
            began = time.perf_counter()
            tokens = await serve(driver, prompts, params)
            return time.perf_counter() - began, tokens
        finally:
            driver.shutdown()

    for run in runs.values():  # untimed: compiles every shape these passes meet
        asyncio.run(timed(run["llm"]))
    for _ in range(args.passes):
        for run in runs.values():
            seconds, tokens = asyncio.run(timed(run["llm"]))
            run["times"].append(seconds)
            run["tokens"] = tokens
    rows = []
    base = statistics.median(runs[sizes[0]]["times"])
    for (tp, dp), run in runs.items():
        median = statistics.median(run["times"])
        found = collectives(run["llm"])
        rows.append(
            {
                "TP": tp,
                "DP": dp,
                "devices": tp * dp,
                "tok/s (median)": round(run["tokens"] / median, 1),
                "vs first": round(base / median, 2),
                "passes (s)": " / ".join(f"{t:.2f}" for t in run["times"]),
                "decode-step collectives": ", ".join(f"{n} {op}" for op, n in found.items() if n) or "none",
            }
        )
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    write_json(
        args.out, {"args": vars(args) | {"out": str(args.out)}, "machine": machine_facts(), "rows": rows}
    )


if __name__ == "__main__":
    main()
