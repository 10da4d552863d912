"""Aggregate generation throughput at several concurrencies on the demo model (or any model).

    python bench/bench_throughput.py [--model PATH] [--concurrency 1 8 32] [--new-tokens 128]

Each run submits N requests at once (short distinct prompts, greedy, EOS ignored so every request
generates exactly --new-tokens) after a warm-up, and reports aggregate generated tokens/s (median of
passes), KV bytes per token, the number of compiled step shapes, and the share of wall time spent on
the host (outside the jitted step calls). It also times the N prompts alone (one token each): with the
short chunks prefilled several to a call, as the engine does, and one call per prompt (interleaved).
Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, request_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default=None, help="e.g. float16 (default: the compute dtype)")
    ap.add_argument("--packed", action="store_true", help="keep a GGUF's quantized tensors packed")
    ap.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL")
    ap.add_argument("--layer-loop", default="scan", choices=["scan", "unrolled"])
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json", help="JSON results file")
    args = ap.parse_args()

    import jax

    from jaxrs import LLM, SamplingParams
    from jaxrs.cli import parse_pairs
    from jaxrs.engine import runner

    most = max(args.concurrency)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        packed=args.packed,
        kernels=parse_pairs(args.kernel),
        max_num_seqs=most,
        kv_cache_tokens=most * (args.new_tokens + 64),
        prefix_caching=False,
        layer_loop=args.layer_loop,
    )
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [llm.tokenizer.encode(request_text(i)) for i in range(most)]
    first_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    batched_chunk = runner.MAX_BATCHED_CHUNK

    def prompts_alone(n: int, chunk: int) -> float:
        """Seconds to prefill n prompts (one token each) with chunks up to `chunk` tokens batched."""
        runner.MAX_BATCHED_CHUNK = chunk
        start = time.perf_counter()
        llm.generate([list(x) for x in prompts[:n]], first_token, use_tqdm=False)
        runner.MAX_BATCHED_CHUNK = batched_chunk
        return time.perf_counter() - start

    rows = []
    for n in args.concurrency:
        rates, host, batched, alone = [], [], [], []
        for p in range(args.passes + 1):  # the first pass compiles
            before = engine.stats().device_seconds
            start = time.perf_counter()
            llm.generate([list(x) for x in prompts[:n]], params, use_tqdm=False)
            wall = time.perf_counter() - start
            device = engine.stats().device_seconds - before
            prefill = (prompts_alone(n, batched_chunk), prompts_alone(n, 0))
            if p:
                rates.append(n * args.new_tokens / wall)
                host.append(1 - device / wall)
                batched.append(prefill[0])
                alone.append(prefill[1])
        rows.append(
            {
                "concurrency": n,
                "tok_s": statistics.median(rates),
                "host_share": statistics.median(host),
                "prompts_batched_s": statistics.median(batched),
                "prompts_one_call_each_s": statistics.median(alone),
            }
        )
    shapes = engine.stats().compiled_shapes
    per_token = engine.kv_bytes_per_token
    print(
        f"\n{engine.model_name}, {args.new_tokens} new tokens per request, greedy, median of "
        f"{args.passes} passes, {jax.default_backend()}, dtype {llm.dtype.name}"
    )
    print(
        "| concurrent sequences | aggregate tok/s | host share of wall time "
        "| N prompts' first tokens, batched prefill s | the same, one call per prompt s |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['tok_s']:.1f} | {100 * r['host_share']:.1f}% "
            f"| {r['prompts_batched_s']:.2f} | {r['prompts_one_call_each_s']:.2f} |"
        )
    print(f"\nKV cache: {per_token} bytes/token; compiled step shapes: {shapes}")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": engine.source,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "backend": jax.default_backend(),
                "rows": rows,
                "kv_bytes_per_token": per_token,
                "compiled_shapes": shapes,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
