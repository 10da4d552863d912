"""Structured output's cost on the demo model: schema compile time, mask time per token, and aggregate
decode throughput at 32 streams with 0, 8 and 32 of them constrained by a JSON schema.

    JAX_PLATFORMS=cpu python bench/bench_structured.py [--streams 32] [--constrained 0 8 32]
        [--max-tokens 64] [--passes 2] [--out bench/results/structured.json]
    JAX_PLATFORMS=cpu python bench/bench_structured.py --sampler-only   # the mask's cost in the sampler
    JAX_PLATFORMS=cpu python bench/bench_structured.py --overlap-steps 40  # masks while / before the forward

Every row samples (temperature 0.7, seeded) exactly `--max-tokens` tokens: free rows ignore EOS, and
constrained rows follow a schema (an array of at least 200 integers) that cannot end sooner, so every
configuration decodes the same number of tokens. Configurations are interleaved pass by pass; the
table gives medians. "0 (1 step)" is the free batch decoding one token per call, as a batch holding any
constrained row does, which separates that cost from the mask's. "N, masks first" fills the masks
before one fused decode call instead of while the forward pass runs (`ModelRunner.overlap_masks`).
Mask time is the host time filling the packed rows (llguidance, all constrained rows of a step), per
constrained token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import llguidance
from common import TOPICS, fmt, machine_facts, markdown_table, median, write_json

from jaxrs import LLM, SamplingParams
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.structured import Grammar
from jaxrs.structured.compiler import GrammarCompiler, grammar_text

LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}
SCHEMAS = {  # compile-time cases
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "nested, enums, bounds": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "kind": {"enum": ["book", "film", "song"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
            "where": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city"],
            },
        },
        "required": ["id", "kind", "tags", "where"],
    },
    "long array": LONG,
}


def compile_times(compiler: GrammarCompiler, repeats: int = 5) -> dict[str, float]:
    """Median ms to turn each schema into a grammar and its first matcher (no cache)."""
    out = {}
    for name, schema in SCHEMAS.items():
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            llguidance.LLMatcher(compiler.lexicon, grammar_text(Grammar.json_schema(schema)))
            times.append((time.perf_counter() - began) * 1e3)
        out[name] = median(times)
    return out


class MaskTimer:
    """Wraps `GrammarCompiler.fill` to add up the host time it takes and the rows it fills."""

    def __init__(self, compiler: GrammarCompiler):
        self.seconds, self.rows, fill = 0.0, 0, compiler.fill

        def timed(rows, masks):
            began = time.perf_counter()
            fill(rows, masks)
            self.seconds += time.perf_counter() - began
            self.rows += len(rows)

        compiler.fill = timed


def one_pass(
    engine: Engine, streams: int, constrained: int, max_tokens: int, seed: int, overlap: bool = True
) -> float:
    """Aggregate tok/s of `streams` rows, the first `constrained` of them under the long schema;
    `overlap`: masks filled while the forward runs (else before one fused call)."""
    engine.runner.overlap_masks = overlap
    tokenizer = engine.tokenizer
    requests = []
    for i in range(streams):
        grammar = Grammar.json_schema(LONG) if i < constrained else None
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.7, seed=seed + i, ignore_eos=grammar is None, grammar=grammar
        )
        prompt = f"Write {TOPICS[i % len(TOPICS)]} as a JSON list of numbers."
        requests.append(engine.add_request(tokenizer.encode(prompt), params))
    began = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    seconds = time.perf_counter() - began
    tokens = sum(len(s.output_ids) for r in requests for s in r.seqs)
    assert tokens == streams * max_tokens, tokens
    return tokens / seconds


def overlap_steps(engine: Engine, streams: int, steps: int) -> dict[str, float]:
    """Median ms of a decode step of `streams` constrained rows, with the masks filled while the forward
    runs and before one fused call, the two alternating step by step (same tokens either way), so
    a changing load falls on both alike; and the median mask fill per step."""
    tokenizer, seqs = engine.tokenizer, []
    for i in range(streams):
        params = SamplingParams(
            max_tokens=steps + 16, temperature=0.7, seed=i, grammar=Grammar.json_schema(LONG)
        )
        prompt = tokenizer.encode(f"Write {TOPICS[i % len(TOPICS)]} as numbers.")
        seqs += engine.add_request(prompt, params).seqs
    while not all(s.output_ids for s in seqs):
        engine.step()  # prompts in
    for _ in range(4):  # both paths compiled
        for overlap in (True, False):
            engine.runner.overlap_masks = overlap
            engine.step()
    fill, fills = engine.grammars.fill, []

    def timed(rows, masks):
        began = time.perf_counter()
        fill(rows, masks)
        fills.append(time.perf_counter() - began)

    engine.grammars.fill = timed
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(steps):
        overlap = k % 2 == 0
        engine.runner.overlap_masks = overlap
        began = time.perf_counter()
        engine.step()
        times[overlap].append((time.perf_counter() - began) * 1e3)
    engine.grammars.fill = fill
    while engine.has_unfinished():
        engine.step()
    return {
        "step ms, masks during the forward": median(times[True]),
        "step ms, masks before one fused call": median(times[False]),
        "mask fill ms per step": median(fills) * 1e3,
    }


def sampler_cost(rows: int, vocab: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of the jitted sampler (sampled, top-p 0.9) on [rows, vocab] logits without and with the
    all-ones mask every step now carries: the mask's device cost to free rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrs.engine.runner import step_flags
    from jaxrs.engine.sampling import build_sampling_batch, sample
    from jaxrs.structured.mask import all_allowed

    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=i) for i in range(rows)]
    batch, flags = build_sampling_batch(
        params, list(range(rows)), [0] * rows, [[0]] * rows, [[]] * rows, rows, vocab
    )
    flags = step_flags(flags)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, vocab)), jnp.float32)
    run = jax.jit(sample, static_argnames="flags")
    out = {}
    for name, b in [("no mask", batch), ("all-ones mask", {**batch, "token_mask": all_allowed(rows, vocab)})]:
        run(logits, b, flags=flags).tokens.block_until_ready()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            run(logits, b, flags=flags).tokens.block_until_ready()
            times.append((time.perf_counter() - began) * 1e3)
        out[name] = median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--constrained", type=int, nargs="+", default=[0, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured.json")
    ap.add_argument(
        "--sampler-only", action="store_true", help="only the sampler's cost with and without mask"
    )
    ap.add_argument("--overlap-steps", type=int, default=0, help="only the overlap A/B, this many steps")
    args = ap.parse_args()
    if args.sampler_only:
        print(sampler_cost(args.streams, 49152))  # the demo model's vocabulary
        return
    if args.overlap_steps:
        llm = LLM(max_num_seqs=args.streams, kv_cache_mb=256)
        print(json.dumps(overlap_steps(llm.engine, args.streams, args.overlap_steps), indent=1))
        return

    llm = LLM(max_num_seqs=args.streams, kv_cache_mb=256)
    began = time.perf_counter()
    compiler = llm.engine.grammars
    wrapper_ms = (time.perf_counter() - began) * 1e3
    compiled = compile_times(compiler)
    timer = MaskTimer(compiler)
    single = Engine(llm.model, EngineConfig(max_num_seqs=args.streams, kv_cache_mb=256, max_decode_steps=1))
    single._grammars = compiler
    configs = [(str(c), llm.engine, c, True) for c in args.constrained] + [("0 (1 step)", single, 0, True)]
    configs += [(f"{c}, masks first", llm.engine, c, False) for c in args.constrained if c]
    for name, engine, c, overlap in configs:  # compile every shape first
        rate = one_pass(engine, args.streams, c, args.max_tokens, seed=0, overlap=overlap)
        print(f"warm-up {name}: {rate:.1f} tok/s", flush=True)
    timer.seconds, timer.rows = 0.0, 0
    rates: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for p in range(args.passes):
        for name, engine, c, overlap in configs:
            seed = 100 * (p + 1)
            rates[name].append(one_pass(engine, args.streams, c, args.max_tokens, seed, overlap))
            print(f"pass {p} {name}: {rates[name][-1]:.1f} tok/s", flush=True)
    free = median(rates[str(args.constrained[0])])
    rows = [
        (name, fmt(median(r)), " / ".join(fmt(x) for x in r), f"{median(r) / free:.2f}x")
        for name, r in rates.items()
    ]
    print(f"vocabulary wrapper (first constrained request): {wrapper_ms:.0f} ms")
    print("schema -> grammar + matcher, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in compiled.items()))
    mask_ms = timer.seconds / max(timer.rows, 1) * 1e3
    print(f"mask fill per constrained token: {mask_ms:.3f} ms ({timer.rows} rows)")
    print(markdown_table(["constrained of 32", "tok/s (median)", "per pass", "vs free"], rows))
    write_json(
        args.out,
        {
            "machine": machine_facts(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "wrapper_ms": wrapper_ms,
            "compile_ms": compiled,
            "mask_ms_per_token": mask_ms,
            "rates": rates,
        },
    )
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
