"""Single-stream prefill and decode speed of the demo model (or any model), with transformers as the peer.

    python bench/bench_single_stream.py [--model PATH] [--prompt-tokens 512] [--new-tokens 128] [--passes 3]

Prints a table of medians and writes bench/results/single_stream.json. Greedy, one sequence, no
stop (EOS ignored) so every pass does the same work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = Path(__file__).read_text() * 8  # varied natural text, long enough for any n here
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def bench_jaxrs(model: str | None, n_prompt: int, n_new: int, passes: int, dtype: str) -> dict:
    from jaxrs import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, kv_cache_mb=256, prefix_caching=False)  # every pass computes the prompt
    ids = prompt_ids(llm.tokenizer, n_prompt)
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    engine = llm.engine
    prefill, decode = [], []
    for i in range(passes + 1):  # the first pass compiles
        seq = engine.add_request(ids, params).seqs[0]
        t0 = time.perf_counter()
        engine.step()  # prefill + first token
        t1 = time.perf_counter()
        while not seq.finished:
            engine.step()
        t2 = time.perf_counter()
        if i:
            prefill.append(n_prompt / (t1 - t0))
            decode.append((len(seq.output_ids) - 1) / (t2 - t1))
    return {
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "compiled_shapes": len(engine.runner.shapes),
        "dtype": str(llm.dtype),
    }


def bench_transformers(model_path: Path, n_prompt: int, n_new: int, passes: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    kw = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    folder = model_path.parent if kw else model_path
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    ids = torch.tensor([prompt_ids(tok, n_prompt)])
    prefill, decode = [], []
    with torch.no_grad():
        for i in range(passes + 1):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            t2 = time.perf_counter()
            if i:
                prefill.append(n_prompt / (t1 - t0))
                decode.append((n_new - 1) / ((t2 - t1) - (t1 - t0)))
    return {
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "dtype": "float32",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo GGUF)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers measurement")
    ap.add_argument("--out", type=Path, default=RESULTS / "single_stream.json", help="JSON results file")
    args = ap.parse_args()

    from jaxrs.loading import resolve_source

    _, path = resolve_source(args.model)
    rows = {"jaxrs": bench_jaxrs(args.model, args.prompt_tokens, args.new_tokens, args.passes, args.dtype)}
    if not args.no_peer:
        rows["transformers (torch CPU, f32)"] = bench_transformers(
            path, args.prompt_tokens, args.new_tokens, args.passes
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
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": path.name,
                "args": vars(args),
                "backend": jax.default_backend(),
                "results": rows,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
            default=lambda o: o.item() if isinstance(o, np.generic) else str(o),
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
