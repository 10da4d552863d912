"""Speculative decoding on CPU: single-stream greedy decode speed with and without it, and acceptance.

    python bench/bench_speculative.py [--target PATH] [--draft PATH] [--ks 2 4] [--new-tokens 64]
        [--passes 2] [--out bench/results/speculative.json]

One target (default Qwen2.5-Coder-1.5B-Instruct Q4_K_M) served plain, with a draft model (default the
0.5B of the same family) at each K of --ks, and with prompt lookup (ngram, K = the largest of --ks), all
engines over the same loaded weights. Prompts: a short chat question and a code-editing request that
repeats its input (where prompt lookup helps). Every engine runs each prompt once untimed (compiles),
then --passes timed passes, interleaved across engines. Decode tok/s = (tokens - 1) / (time from the
first token to the last), median over passes; acceptance = accepted / proposed draft tokens over the
timed passes; the outputs must equal the plain engine's token for token (greedy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, machine_facts, markdown_table, median, write_json

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model

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
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = ap.parse_args()

    loaded = load_model(args.target)
    base = dict(kv_cache_mb=64, max_model_len=1024, prefix_caching=False, max_num_seqs=1)
    specs: dict[str, dict | None] = {"plain": None}
    for k in args.ks:
        specs[f"draft K={k}"] = {"model": args.draft, "num_speculative_tokens": k}
    specs[f"ngram K={max(args.ks)}"] = {"method": "ngram", "num_speculative_tokens": max(args.ks)}
    engines = {name: Engine(loaded, EngineConfig(**base, speculative_config=s)) for name, s in specs.items()}
    prompts = {
        name: loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        for name, text in PROMPTS.items()
    }
    prompts = {
        name: loaded.tokenizer.encode(text, add_special_tokens=False) for name, text in prompts.items()
    }
    reference: dict[str, list[int]] = {}
    for engine in engines.values():  # compile every shape a pass needs
        for prompt, ids in prompts.items():
            tokens, _ = run_once(engine, ids, args.new_tokens)
            reference.setdefault(prompt, tokens)
    speeds: dict[tuple[str, str], list[float]] = {}
    same = {}
    for _ in range(args.passes):
        for prompt, ids in prompts.items():
            for name, engine in engines.items():
                counters = engine.stats().spec_decode
                tokens, speed = run_once(engine, ids, args.new_tokens)
                speeds.setdefault((name, prompt), []).append(speed)
                same[(name, prompt)] = same.get((name, prompt), True) and tokens == reference[prompt]
                after = engine.stats().spec_decode
                if counters is not None:
                    accepted = after.num_accepted_tokens - counters.num_accepted_tokens
                    proposed = after.num_draft_tokens - counters.num_draft_tokens
                    speeds.setdefault((name, prompt, "acc"), []).append(accepted / max(proposed, 1))
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
                    "same_tokens_as_plain": same[(name, prompt)],
                }
            )
    header = list(rows[0])
    print(markdown_table(header, [[row[h] for h in header] for row in rows]))
    write_json(Path(args.out), {"args": vars(args), "machine": machine_facts(), "rows": rows})


if __name__ == "__main__":
    main()
