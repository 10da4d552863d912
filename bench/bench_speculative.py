"""Speculative decoding on CPU: single-stream greedy decode speed with and without it, and acceptance.

    python bench/bench_speculative.py [--target PATH] [--draft PATH] [--ks 2 4] [--new-tokens 64]
        [--passes 2] [--prompts short code-edit] [--few-rows-ab] [--llamacpp] [--target-unpacked]
        [--draft-isq Q8_0 Q4_0] [--draft-file-layout] [--kv-cache-dtype float32] [--off-streams 32]
        [--out bench/results/speculative.json]

One target (default Qwen2.5-Coder-1.5B-Instruct Q4_K_M) served plain, with a draft model (default the
0.5B of the same family) at each K of --ks, and with prompt lookup (ngram, K = the largest of --ks), all
engines over the same loaded weights. Prompts: a short chat question and a code-editing request that
repeats its input (where prompt lookup helps). Every engine runs each prompt once untimed (compiles),
then --passes timed passes, interleaved across engines. Decode tok/s = (tokens - 1) / (time from the
first token to the last), median over passes; acceptance = accepted / proposed draft tokens over the
timed passes; the outputs must equal the plain engine's token for token (greedy).

`--few-rows-ab`: every engine twice, the second ("... whole") with the packed few-row products off
(`qmatmul.CPU_FEW_ROWS = 1` while it compiles), interleaved like the rest.

`--llamacpp`: llama.cpp in the same passes, through llama-cpp-python (`peer_worker.py` under the peer
virtual environment `bench/setup_peers.sh` makes), each configuration its own process on the same GGUFs
and token ids: plain, prompt lookup (`LlamaPromptLookupDecoding`) and the draft model behind its
`LlamaDraftModel` hook, at each K of --ks. Their "same tokens" compares with llama.cpp's plain row.

`--target-unpacked` loads the target dequantized (`packed=False`) in float32; `--draft-isq FORMAT...` loads
the draft with ISQ into each FORMAT (one set of draft engines per format, named by it when there are
several): with `--draft` the target's own file, a low-bit copy of the target. `--draft-file-layout`: each
ISQ draft also as ISQ left it before `loading.device_layout` (its file format, e.g. Q4_0's nibbles, rather
than XLA:CPU's byte-code layout), for a before/after A/B in the same passes.

`--off-streams N`: aggregate throughput of N requests at once that all send `speculative: false`
(`SamplingParams.speculative`) to an engine with the largest-K draft config, against an engine without
speculation, both with max_num_seqs N, interleaved over --passes (the order alternating); tok/s =
generated tokens / wall time, median over passes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
from bench_peers import Worker, peer_python
from common import RESULTS, machine_facts, markdown_table, median, request_text, write_json

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import device_layout, load_model
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


def engine_for(loaded, base: dict, name: str, spec: dict | None) -> Engine:
    """An engine over `loaded` with speculative config `spec`; a "file-layout" draft loads its packed
    tensors in the formats ISQ makes (`device_layout` off while it loads)."""
    if "file-layout" not in name:
        return Engine(loaded, EngineConfig(**base, speculative_config=spec))
    relays = device_layout.relays_packed_weights
    device_layout.relays_packed_weights = lambda device_layout=True: False
    try:
        return Engine(loaded, EngineConfig(**base, speculative_config=spec))
    finally:
        device_layout.relays_packed_weights = relays


def llamacpp_workers(args: argparse.Namespace) -> dict[str, Worker]:
    """One llama.cpp process per configuration, loaded and ready (empty, with a note, when the peer
    environment is missing)."""
    python = peer_python("llamacpp")
    if not python.exists():
        print(f"--llamacpp: no llama.cpp environment at {python} (bench/setup_peers.sh makes it); skipped")
        return {}
    script = Path(__file__).parent / "peer_worker.py"
    configs = {"llama.cpp plain": []}
    for k in args.ks:
        configs[f"llama.cpp prompt-lookup K={k}"] = ["--prompt-lookup", str(k)]
    for k in args.ks:
        configs[f"llama.cpp draft K={k}"] = ["--draft-model", args.draft, "--num-draft-tokens", str(k)]
    log = Path(args.out).with_suffix(".llamacpp.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    workers = {}
    for name, extra in configs.items():
        cmd = [str(python), str(script), "llamacpp", "--model", args.target, "--threads", "2", *extra]
        workers[name] = Worker(cmd, dict(os.environ), log)
    for worker in workers.values():
        worker.read(timeout=600)  # the ready line
    return workers


def llamacpp_once(worker: Worker, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tok/s of one request in a llama.cpp worker."""
    reply = worker.ask(600, op="single", ids=ids, new_tokens=new_tokens)
    return reply["tokens"], reply["decode_tokens"] / max(reply["decode_s"], 1e-9)


def streams_tok_s(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate tok/s of all prompts submitted at once, every request with speculation off."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, speculative=False)
    start = time.perf_counter()
    requests = [engine.add_request(ids, params) for ids in prompts]
    while engine.has_unfinished():
        engine.step()
    return sum(len(s.output_ids) for r in requests for s in r.seqs) / (time.perf_counter() - start)


def off_streams(loaded, args: argparse.Namespace, base: dict, spec: dict) -> list[dict]:
    """--off-streams: N requests with `speculative: false` on a speculative engine vs a plain one."""
    n = args.off_streams
    config = dict(base, max_num_seqs=n, kv_cache_mb=max(base["kv_cache_mb"], 512))
    engines = {
        "plain": Engine(loaded, EngineConfig(**config)),
        "speculative engine, requests off": Engine(loaded, EngineConfig(**config, speculative_config=spec)),
    }
    prompts = [
        loaded.tokenizer.encode(
            loaded.tokenizer.apply_chat_template(
                [{"role": "user", "content": request_text(i)}], add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for i in range(n)
    ]
    for engine in engines.values():  # compiles
        streams_tok_s(engine, prompts, args.new_tokens)
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for p in range(args.passes):
        order = list(engines) if p % 2 == 0 else list(reversed(engines))
        for name in order:
            speeds[name].append(streams_tok_s(engines[name], prompts, args.new_tokens))
            print(f"{n} streams, {name}: {speeds[name][-1]:.2f} tok/s (load {os.getloadavg()[0]:.1f})")
    plain = median(speeds["plain"])
    return [
        {
            "streams": n,
            "engine": name,
            "aggregate_tok_s": round(median(v), 2),
            "vs_plain": round(median(v) / plain, 3),
            "passes": [round(x, 2) for x in v],
            "spec_decode_drafts": None
            if engines[name].stats().spec_decode is None
            else engines[name].stats().spec_decode.num_drafts,
        }
        for name, v in speeds.items()
    ]


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
    ap.add_argument("--target-unpacked", action="store_true", help="the target dequantized to float32")
    ap.add_argument("--kv-cache-dtype", help="the engines' KV cache dtype (default: the engine's)")
    ap.add_argument("--draft-isq", metavar="FORMAT", nargs="+", help="ISQ drafts in each FORMAT (e.g. Q4_0)")
    ap.add_argument("--draft-file-layout", action="store_true", help="ISQ drafts also in their file formats")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp plain and speculative")
    ap.add_argument("--off-streams", type=int, metavar="N", help="N requests with speculation off, vs plain")
    ap.add_argument("--out", default=str(RESULTS / "speculative.json"))
    args = ap.parse_args()

    loaded = load_model(args.target, **({"packed": False} if args.target_unpacked else {}))
    base = dict(kv_cache_mb=64, max_model_len=1024, prefix_caching=False, max_num_seqs=1)
    if args.kv_cache_dtype:
        base["kv_cache_dtype"] = args.kv_cache_dtype
    isqs = args.draft_isq or [None]
    layouts = ("", " file-layout") if args.draft_file_layout and args.draft_isq else ("",)
    specs: dict[str, dict | None] = {"plain": None}
    for fmt in isqs:
        draft = {"model": args.draft} | ({"isq": fmt} if fmt else {})
        tag = f" {fmt}" if len(isqs) > 1 else ""
        for layout in layouts:
            for k in args.ks:
                specs[f"draft{tag}{layout} K={k}"] = draft | {"num_speculative_tokens": k}
        if args.adaptive:
            specs[f"draft{tag} K={max(args.ks)} adaptive"] = draft | {
                "num_speculative_tokens": max(args.ks),
                "adaptive_k": True,
            }
    largest = specs[f"draft{f' {isqs[0]}' if len(isqs) > 1 else ''} K={max(args.ks)}"]
    specs[f"ngram K={max(args.ks)}"] = {"method": "ngram", "num_speculative_tokens": max(args.ks)}
    if args.few_rows_ab:
        specs = {f"{name}{tag}": s for name, s in specs.items() for tag in ("", " whole")}
    engines = {name: engine_for(loaded, base, name, s) for name, s in specs.items()}
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
    workers = llamacpp_workers(args) if args.llamacpp else {}
    for worker in workers.values():  # llama.cpp's own first runs, untimed
        for prompt, ids in prompts.items():
            tokens, _ = llamacpp_once(worker, ids, args.new_tokens)
            reference.setdefault(("llama.cpp", prompt), tokens)
    load = [os.getloadavg()[0]]
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
            for name, worker in workers.items():
                tokens, speed = llamacpp_once(worker, ids, args.new_tokens)
                speeds.setdefault((name, prompt), []).append(speed)
                ok = tokens == reference[("llama.cpp", prompt)]
                same[(name, prompt)] = same.get((name, prompt), True) and ok
            load.append(os.getloadavg()[0])
    for worker in workers.values():
        worker.close()
    recompiled = [name for name, e in engines.items() if e.stats().compiled_shapes != compiled[name]]
    if recompiled:
        print(f"compiled new step shapes in the timed passes: {recompiled}")
    rows = []
    for prompt in prompts:
        plain = median(speeds[("plain", prompt)])
        for name in [*engines, *workers]:
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
    print(f"1-minute load average over the timed passes: {', '.join(f'{x:.1f}' for x in load)}")
    result = {"args": vars(args), "machine": machine_facts(), "rows": rows, "load_average_1min": load}
    if workers:
        plain = [reference[("llama.cpp", p)] == reference[p] for p in prompts]
        result["llamacpp_plain_same_tokens_as_jaxrs"] = dict(zip(prompts, plain, strict=True))
        print(f"llama.cpp plain gives jaxrs plain's tokens: {result['llamacpp_plain_same_tokens_as_jaxrs']}")
    if args.off_streams:
        del engines  # their KV pools
        result["off_streams"] = off_streams(loaded, args, base, largest)
        header = list(result["off_streams"][0])
        print(markdown_table(header, [[row[h] for h in header] for row in result["off_streams"]]))
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
