"""Speculative decoding on CPU: single-stream greedy decode speed with and without it, and acceptance.

    python bench/bench_speculative.py [--target PATH] [--draft PATH] [--ks 2 4] [--new-tokens 64]
        [--passes 2] [--prompts short code-edit] [--few-rows-ab] [--out bench/results/speculative.json]

One target (default Qwen2.5-Coder-1.5B-Instruct Q4_K_M) served plain, with a draft model (default the
0.5B of the same family) at each K of --ks, and with prompt lookup (ngram, K = the largest of --ks), all
engines over the same loaded weights. Prompts: a short chat question and a code-editing request that
repeats its input (where prompt lookup helps). Every engine runs each prompt once untimed (compiles),
then --passes timed passes, interleaved across engines. Decode tok/s = (tokens - 1) / (time from the
first token to the last), median over passes; acceptance = accepted / proposed draft tokens over the
timed passes; the outputs must equal the plain engine's token for token (greedy).

`--few-rows-ab`: every engine twice, the second ("... whole") with the packed few-row products off
(`qmatmul.CPU_FEW_ROWS = 1` while it compiles), interleaved like the rest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
from common import RESULTS, machine_facts, markdown_table, median, write_json

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from pallas_kernels import qmatmul

MODELS = Path.home() / ".cache" / "jaxrs" / "models"
CODE = """def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config
"""
PROMPTS = {
    "short": "Explain in two sentences what a hash map is.",
    "code-edit": "Rewrite this function so it also accepts ':' as a separator. Reply with the whole "
    "function only.\n\n" + CODE,
}


def run_once(engine: Engine, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tok/s of one request alone."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    request = engine.add_request(ids, params)
    seq = request.seqs[0]
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and seq.output_ids:
            first = (time.perf_counter(), len(seq.output_ids))
    end = time.perf_counter()
    return list(seq.output_ids), (len(seq.output_ids) - first[1]) / max(end - first[0], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(MODELS / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"))
    ap.add_argument("--draft", default=str(MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    ap.add_argument("--adaptive", action="store_true", help="also the largest K with adaptive_k on")
    ap.add_argument("--few-rows-ab", action="store_true", help="each engine also with few-row products off")
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = ap.parse_args()

    loaded = load_model(args.target)
    base = dict(kv_cache_mb=64, max_model_len=1024, prefix_caching=False, max_num_seqs=1)
    specs: dict[str, dict | None] = {"plain": None}
    for k in args.ks:
        specs[f"draft K={k}"] = {"model": args.draft, "num_speculative_tokens": k}
    if args.adaptive:
        specs[f"draft K={max(args.ks)} adaptive"] = {
            "model": args.draft,
            "num_speculative_tokens": max(args.ks),
            "adaptive_k": True,
        }
    specs[f"ngram K={max(args.ks)}"] = {"method": "ngram", "num_speculative_tokens": max(args.ks)}
    if args.few_rows_ab:
        specs = {f"{name}{tag}": s for name, s in specs.items() for tag in ("", " whole")}
    engines = {name: Engine(loaded, EngineConfig(**base, speculative_config=s)) for name, s in specs.items()}
    few_rows = qmatmul.CPU_FEW_ROWS
    prompts = {
        name: loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        for name, text in PROMPTS.items()
        if name in args.prompts
    }
    prompts = {
        name: loaded.tokenizer.encode(text, add_special_tokens=False) for name, text in prompts.items()
    }
    reference: dict[str, list[int]] = {}
    for name, engine in engines.items():  # compile every shape a pass needs
        qmatmul.CPU_FEW_ROWS = 1 if name.endswith(" whole") else few_rows
        jax.clear_caches()  # its steps traced under this setting
        for prompt, ids in prompts.items():
            tokens, _ = run_once(engine, ids, args.new_tokens)
            reference.setdefault(prompt, tokens)
    speeds: dict[tuple[str, str], list[float]] = {}
    same = {}
    compiled = {name: engine.stats().compiled_shapes for name, engine in engines.items()}
    for _ in range(args.passes):
        for prompt, ids in prompts.items():
            for name, engine in engines.items():
                qmatmul.CPU_FEW_ROWS = 1 if name.endswith(" whole") else few_rows
                counters = engine.stats().spec_decode
                tokens, speed = run_once(engine, ids, args.new_tokens)
                speeds.setdefault((name, prompt), []).append(speed)
                same[(name, prompt)] = same.get((name, prompt), True) and tokens == reference[prompt]
                after = engine.stats().spec_decode
                if counters is not None:
                    accepted = after.num_accepted_tokens - counters.num_accepted_tokens
                    proposed = after.num_draft_tokens - counters.num_draft_tokens
                    speeds.setdefault((name, prompt, "acc"), []).append(accepted / max(proposed, 1))
                    drafts = after.num_drafts - counters.num_drafts
                    speeds.setdefault((name, prompt, "len"), []).append(1 + accepted / max(drafts, 1))
    recompiled = [name for name, e in engines.items() if e.stats().compiled_shapes != compiled[name]]
    if recompiled:
        print(f"compiled new step shapes in the timed passes: {recompiled}")
    rows = []
    for prompt in prompts:
        plain = median(speeds[("plain", prompt)])
        for name in engines:
            tok_s = median(speeds[(name, prompt)])
            acc = speeds.get((name, prompt, "acc"))
            rows.append(
                {
                    "prompt": prompt,
                    "engine": name,
                    "decode_tok_s": round(tok_s, 2),
                    "speedup": round(tok_s / plain, 2),
                    "acceptance": None if acc is None else round(median(acc), 3),
                    "mean_accepted_length": None
                    if acc is None
                    else round(median(speeds[(name, prompt, "len")]), 2),
                    "same_tokens_as_plain": same[(name, prompt)],
                }
            )
    header = list(rows[0])
    print(markdown_table(header, [[row[h] for h in header] for row in rows]))
    write_json(Path(args.out), {"args": vars(args), "machine": machine_facts(), "rows": rows})


if __name__ == "__main__":
    main()
