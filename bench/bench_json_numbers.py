"""JSON numbers with and without the digit bound (`jaxrs.structured.numbers`) on a real model: greedy
answers to prompts that invite long numbers (pi, a division), each under a schema with an unbounded
`number`, once with the schema as given and once bounded.

    JAX_PLATFORMS=cpu python bench/bench_json_numbers.py [MODEL.gguf] [--max-tokens 100]

Prints each answer's finish reason, token count and text, and the seconds each set took.
"""

from __future__ import annotations

import argparse
import time

import jaxrs.structured.compiler as compiler
from jaxrs import LLM, SamplingParams
from jaxrs.structured import Grammar


def number_schema(*keys: str) -> dict:
    return {"type": "object", "properties": {k: {"type": "number"} for k in keys}, "required": list(keys)}


CASES = [
    ("What is the temperature in Paris right now? Answer in JSON.", number_schema("temperature")),
    ("Give pi and e to many digits, as JSON.", number_schema("pi", "e")),
    ("What is 10 divided by 3? Answer as JSON with the exact result.", number_schema("result")),
    ("What is 77 divided by 3? Answer as JSON.", number_schema("quotient")),
    ("Convert 78 Fahrenheit to Celsius. Answer as JSON.", number_schema("celsius")),
    ("Give the average rating of a product from 1 to 5, as JSON.", number_schema("rating")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a GGUF or HF folder (default: the demo)")
    ap.add_argument("--max-tokens", type=int, default=100)
    args = ap.parse_args()
    llm = LLM(args.model, kv_cache_mb=64, max_model_len=1024, max_num_seqs=len(CASES))
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": p}]) for p, _ in CASES]
    bounded = compiler.bounded_numbers
    for label, rewrite in (("as given", lambda schema: schema), ("bounded", bounded)):
        compiler.bounded_numbers = rewrite
        llm.engine.grammars._texts.clear()  # compile the schemas again under this rewrite
        params = [
            SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=Grammar.json_schema(s))
            for _, s in CASES
        ]
        began = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        for out in outs:
            print(f"{label}: {out.finish_reason} {len(out.token_ids)} tokens {out.text!r}", flush=True)
        print(f"{label}: {time.perf_counter() - began:.1f} s", flush=True)
    compiler.bounded_numbers = bounded


if __name__ == "__main__":
    main()
