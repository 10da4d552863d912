"""Where a speculative decode step's time goes on CPU: the draft call, the verify call and the host work
around them, against a plain decode step of the target and of the draft model alone.

    python bench/profile_speculative.py [--target PATH] [--target-unpacked] [--draft PATH]
        [--draft-isq Q8_0] [--ks 2 4 8] [--new-tokens 32] [--prompt code-edit] [--repeats 3]
        [--kv-cache-dtype float32] [--out bench/results/speculative_profile.json]

Engines: the target alone, the draft model alone (loaded as the speculative engines load it) and the
target with the draft at each K of --ks. Each runs the prompt once untimed (compiles), then --repeats
times, interleaved. Per engine step after the first token: its wall time, the target runner's step-call
time and the draft runner's (`ModelRunner.device_seconds`: dispatch, device work and the copy back),
and the rest, host work (scheduling, the sampling batches and metadata, appending tokens). Medians over
every decode step of every repeat; ms a token = decode wall time / tokens emitted. The prompt's
prefill: the draft runner's share of the prefill step (its prefill of the same chunk).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench_speculative import MODELS, PROMPTS
from common import RESULTS, machine_facts, markdown_table, median, write_json

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model


def profile_once(
    engine: Engine, ids: list[int], new_tokens: int
) -> tuple[list[int], list[float], list[tuple]]:
    """Greedy tokens, the prefill steps' (wall, target, draft) seconds, and per decode step (wall,
    target, draft seconds, tokens emitted)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    seq = engine.add_request(ids, params).seqs[0]
    spec = engine.speculator
    runners = [engine.runner, *([spec.draft] if spec is not None and spec.draft is not None else [])]
    prefill, steps = [0.0, 0.0, 0.0], []
    while engine.has_unfinished():
        before, count = [r.device_seconds for r in runners], len(seq.output_ids)
        began = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - began
        target, draft = ([r.device_seconds - b for r, b in zip(runners, before, strict=True)] + [0.0])[:2]
        if count == 0:
            prefill = [p + x for p, x in zip(prefill, (wall, target, draft), strict=True)]
        else:
            steps.append((wall, target, draft, len(seq.output_ids) - count))
    return list(seq.output_ids), prefill, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--draft", help="default: the target's own file")
    ap.add_argument("--target-unpacked", action="store_true", help="the target dequantized to float32")
    ap.add_argument("--draft-isq", metavar="FORMAT", help="load the draft with ISQ into FORMAT")
    ap.add_argument("--ks", type=int, nargs="+", default=[4])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="code-edit", choices=list(PROMPTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", help="the engines' KV cache dtype (default: the engine's)")
    ap.add_argument("--out", default=str(RESULTS / "speculative_profile.json"))
    args = ap.parse_args()
    args.draft = args.draft or args.target

    base = dict(kv_cache_mb=64, max_model_len=1024, prefix_caching=False, max_num_seqs=1)
    if args.kv_cache_dtype:
        base["kv_cache_dtype"] = args.kv_cache_dtype
    target = load_model(args.target, **({"packed": False} if args.target_unpacked else {}))
    draft = {"model": args.draft} | ({"isq": args.draft_isq} if args.draft_isq else {})
    alone = load_model(args.draft, **({"isq": args.draft_isq} if args.draft_isq else {}))
    engines = {
        "target alone": Engine(target, EngineConfig(**base)),
        "draft alone": Engine(alone, EngineConfig(**base)),
    }
    for k in args.ks:
        spec = draft | {"num_speculative_tokens": k}
        engines[f"K={k}"] = Engine(target, EngineConfig(**base, speculative_config=spec))
    text = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[args.prompt]}], add_generation_prompt=True
    )
    ids = target.tokenizer.encode(text, add_special_tokens=False)
    reference = {name: profile_once(e, ids, args.new_tokens)[0] for name, e in engines.items()}  # compiles
    prefills: dict[str, list[list[float]]] = {name: [] for name in engines}
    steps: dict[str, list[tuple]] = {name: [] for name in engines}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, engine in engines.items():
            tokens, prefill, decode = profile_once(engine, ids, args.new_tokens)
            assert tokens == reference[name], f"{name}: greedy tokens changed between runs"
            prefills[name].append(prefill)
            steps[name] += decode
        load.append(os.getloadavg()[0])
    rows = []
    for name in engines:
        walls = [s[0] for s in steps[name]]
        emitted = sum(s[3] for s in steps[name])
        row = {
            "engine": name,
            "steps": len(walls),
            "tokens_a_step": round(emitted / len(walls), 2),
            "step_ms": round(1e3 * median(walls), 1),
            "target_call_ms": round(1e3 * median(s[1] for s in steps[name]), 1),
            "draft_call_ms": round(1e3 * median(s[2] for s in steps[name]), 1),
            "host_ms": round(1e3 * median(s[0] - s[1] - s[2] for s in steps[name]), 2),
            "ms_a_token": round(1e3 * sum(walls) / emitted, 1),
            "prefill_ms": round(1e3 * median(p[0] for p in prefills[name]), 1),
            "prefill_draft_ms": round(1e3 * median(p[2] for p in prefills[name]), 1),
            "same_tokens_as_target": reference[name] == reference["target alone"],
        }
        rows.append(row)
    plain = rows[0]["ms_a_token"]
    for row in rows:
        row["speedup"] = round(plain / row["ms_a_token"], 2)
    header = list(rows[0])
    print(markdown_table(header, [[row[h] for h in header] for row in rows]))
    print(f"1-minute load average: {', '.join(f'{x:.1f}' for x in load)}")
    write_json(
        Path(args.out),
        {"args": vars(args), "machine": machine_facts(), "rows": rows, "load_average_1min": load},
    )


if __name__ == "__main__":
    main()
