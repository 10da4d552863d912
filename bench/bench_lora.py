"""Aggregate decode throughput with LoRA adapters on the demo model (or any model).

    python bench/bench_lora.py [--model PATH] [--streams 32] [--new-tokens 32] [--ranks 8 64]
                               [--adapters 0 1 4 8] [--passes 2]

Random adapters (every attention and MLP projection, each rank in --ranks) are written in peft's
format; one engine serves the base alone (no LoRA) and one per rank serves max(--adapters) adapters.
Each run submits --streams requests at once (distinct short prompts, greedy, EOS ignored) whose rows use
0 (base rows through the LoRA engine), 1, 4 or 8 distinct adapters, round-robin, and reports decode
tokens/s: tokens after each request's first, over the time from the last first token to the end.
Engines are interleaved pass by pass; the first pass compiles and is dropped. Writes
bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, request_text


def write_adapter(folder: Path, cfg, rank: int, seed: int) -> Path:
    """A random peft LoRA adapter (non-zero B) over every projection `cfg`'s model has."""
    from safetensors.numpy import save_file

    from jaxrs.lora.adapter import adaptable_targets

    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (_, (out_features, in_features)) in adaptable_targets(cfg).items():
        for layer in range(cfg.num_layers):
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, 0.02, (rank, in_features)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, 0.02, (out_features, rank)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    targets = sorted({m.split(".")[-1] for m in adaptable_targets(cfg)})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def decode_rate(llm, prompts: list[list[int]], params, loras: list[str | None]) -> float:
    """Decode tokens/s of one batch: tokens after the first, from the last first token to the end."""
    import dataclasses

    engine = llm.engine
    requests = [
        engine.add_request(p, dataclasses.replace(params, lora=n))
        for p, n in zip(prompts, loras, strict=True)
    ]
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and all(r.seqs[0].output_ids for r in requests):
            first = time.perf_counter()
    end = time.perf_counter()
    return len(prompts) * (params.max_tokens - 1) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4, 8])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "lora.json")
    args = ap.parse_args()

    import jax

    from jaxrs import LLM, SamplingParams

    n = args.streams
    common = dict(max_num_seqs=n, kv_cache_tokens=n * (args.new_tokens + 64), prefix_caching=False)
    base = LLM(args.model, **common)
    cfg = base.engine.model.config
    most = max(args.adapters)
    tmp = Path(tempfile.mkdtemp(prefix="jaxrs-lora-bench-"))
    engines = {"base": base}
    for rank in args.ranks:
        adapters = {
            f"r{rank}-{i}": str(write_adapter(tmp / f"r{rank}-{i}", cfg, rank, i)) for i in range(most)
        }
        engines[f"rank {rank}"] = LLM(
            args.model, lora_adapters=adapters, max_loras=most, max_lora_rank=rank, **common
        )
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [base.tokenizer.encode(request_text(i)) for i in range(n)]
    runs = [("base", 0)] + [(f"rank {r}", k) for r in args.ranks for k in args.adapters]
    rates: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for p in range(args.passes + 1):
        for name, k in runs:
            rank = name.split()[-1]
            loras = [None] * n if k == 0 else [f"r{rank}-{i % k}" for i in range(n)]
            rate = decode_rate(engines[name], prompts, params, loras)
            if p:
                rates[(name, k)].append(rate)
            print(f"pass {p} {name} {k} adapters: {rate:.1f} tok/s", flush=True)
    base_rate = statistics.median(rates[("base", 0)])
    rows = [
        {
            "engine": name,
            "adapters": k,
            "tok_s": statistics.median(r),
            "vs_base": statistics.median(r) / base_rate,
        }
        for (name, k), r in rates.items()
    ]
    print(
        f"\n{base.engine.model_name}, {n} streams, {args.new_tokens} new tokens each, greedy, median of "
        f"{args.passes} passes, {jax.default_backend()}"
    )
    print("| engine | distinct adapters in the batch | decode tok/s | vs base |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['adapters']} | {r['tok_s']:.1f} | {r['vs_base']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"streams": n, "new_tokens": args.new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
