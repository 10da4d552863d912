"""Single-stream prefill and decode speed of the demo model (or any model), with transformers as the peer.

    python bench/bench_single_stream.py [--model PATH] [--prompt-tokens 512] [--new-tokens 128] [--passes 3]

Prints a table of medians and writes bench/results/single_stream.json. Greedy, one sequence, no
stop (EOS ignored) so every pass does the same work.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

from common import RESULTS, median, prompt_ids, write_json
from peer_worker import Transformers, jaxrs_single


def rates(run: Callable[[], dict], passes: int) -> dict:
    """Median prefill and decode tok/s of `run()` (a `peer_worker` single-sequence result) over
    `passes` passes after a first one that warms up (compiles)."""
    prefill, decode = [], []
    for i in range(passes + 1):
        r = run()
        if i:
            prefill.append(r["prompt_tokens"] / r["ttft_s"])
            decode.append(r["decode_tokens"] / r["decode_s"])
    return {"prefill_tok_s": median(prefill), "decode_tok_s": median(decode)}


def bench_jaxrs(model: str | None, n_prompt: int, n_new: int, passes: int, dtype: str) -> tuple[dict, list]:
    from jaxrs import LLM

    # weights and cache in `dtype` (not the packed, float16-cache defaults); every pass computes the prompt
    llm = LLM(model, dtype=dtype, packed=False, kv_cache_dtype=dtype, kv_cache_mb=256, prefix_caching=False)
    ids = prompt_ids(llm.tokenizer, n_prompt)
    result = rates(lambda: jaxrs_single(llm.engine, ids, n_new), passes)
    return result | {"compiled_shapes": llm.engine.stats().compiled_shapes, "dtype": str(llm.dtype)}, ids


def bench_transformers(model_path: Path, ids: list[int], n_new: int, passes: int, threads: int) -> dict:
    """transformers on the same prompt ids (weights dequantized to f32)."""
    peer = Transformers(argparse.Namespace(model=str(model_path), threads=threads))
    return rates(lambda: peer.single(ids, "", n_new), passes) | {"dtype": "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo GGUF)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "single_stream.json", help="JSON results file")
    args = ap.parse_args()

    from jaxrs.loading import resolve_source

    _, path = resolve_source(args.model)
    ours, ids = bench_jaxrs(args.model, args.prompt_tokens, args.new_tokens, args.passes, args.dtype)
    rows = {"jaxrs": ours}
    if not args.no_peer:
        rows["transformers (torch CPU, f32)"] = bench_transformers(
            path, ids, args.new_tokens, args.passes, args.threads
        )
    import jax

    print(
        f"\nmodel {path.name}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"median of {args.passes} passes, {jax.default_backend()} ({platform.machine()})"
    )
    print("| engine | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |")
    if len(rows) > 1:
        ours, peer = rows["jaxrs"], rows["transformers (torch CPU, f32)"]
        print(
            f"\nratio jaxrs/transformers: prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x, "
            f"decode {ours['decode_tok_s'] / peer['decode_tok_s']:.2f}x"
        )
    write_json(
        args.out,
        {"model": path.name, "args": vars(args), "backend": jax.default_backend(), "results": rows},
    )


if __name__ == "__main__":
    main()
