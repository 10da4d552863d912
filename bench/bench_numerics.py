"""What a default that changes numerics costs: perplexity and greedy agreement under sets of `LLM` options.

    JAX_PLATFORMS=cpu python bench/bench_numerics.py [--models PATH ...]
        [--setting LABEL:KEY=VALUE,... ...] [--new-tokens 32] [--out bench/results/numerics.json]

For each model (the demo unless `--models`) and each setting (the first is the reference; default: `exact` =
`packed=False, kv_cache_dtype=float32, gemm_dtype=float32`, then `defaults` = no options), an `LLM`
is loaded with those options and measures: perplexity of tests/data/english.txt (`jaxrs.eval.perplexity`, one
prefill), the greatest difference of its per-token log-likelihoods from the reference's, and greedy tokens of
five 96-token prompts (consecutive pieces of `common.prompt_text()`, `--new-tokens` each, EOS ignored): how
many match the reference's tokens exactly, and the first position where the others part. Values are Python
literals where they parse (`packed=False`), else strings (`kv_cache_dtype=float16`). Prints a table, writes
JSON.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import numpy as np
from common import RESULTS, markdown_table, prompt_ids, write_results

ENGLISH = Path(__file__).parent.parent / "tests" / "data" / "english.txt"
PROMPT_TOKENS = 96  # each greedy prompt: more rows than decode's few-row products, so a prefill GEMM
PROMPTS = 5
DEFAULT_SETTINGS = [
    "exact:packed=False,kv_cache_dtype=float32,gemm_dtype=float32",
    "defaults",
]


def parse_setting(text: str) -> tuple[str, dict]:
    """`LABEL[:KEY=VALUE,...]` as (label, LLM options)."""
    label, _, items = text.partition(":")
    options = {}
    for item in filter(None, items.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return label, options


def measure(model: str | None, options: dict, new_tokens: int) -> dict:
    """Perplexity, per-token log-likelihoods and greedy tokens of `model` under `options`."""
    from jaxrs import LLM, SamplingParams

    llm = LLM(model, max_model_len=1024, prefix_caching=False, **options)
    text = ENGLISH.read_text()
    ids = llm.tokenizer.encode(text)[:1024]
    logprobs = np.array(llm.score([ids[:1]], [ids[1:]])[0])
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    text_ids = prompt_ids(llm.tokenizer, PROMPTS * PROMPT_TOKENS)
    prompts = [text_ids[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(PROMPTS)]
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    return {"perplexity": float(np.exp(-logprobs.mean())), "logprobs": logprobs, "greedy": greedy}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[None])
    ap.add_argument("--setting", action="append", default=[], metavar="LABEL[:KEY=VALUE,...]")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "numerics.json")
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.setting or DEFAULT_SETTINGS]
    rows, results = [], []
    for model in args.models:
        name = Path(model).name if model else "demo"
        reference = None
        for label, options in settings:
            found = measure(model, options, args.new_tokens)
            reference = reference or found
            diff = float(np.max(np.abs(found["logprobs"] - reference["logprobs"])))
            parts = [
                first_difference(a, b) for a, b in zip(found["greedy"], reference["greedy"], strict=True)
            ]
            same = sum(p is None for p in parts)
            where = ", ".join(str(p) for p in parts if p is not None) or "-"
            ppl, ref_ppl = found["perplexity"], reference["perplexity"]
            rows.append(
                [
                    name,
                    label,
                    f"{ppl:.4f} ({100 * (ppl / ref_ppl - 1):+.3f}%)",
                    f"{diff:.3f}",
                    f"{same} of {len(parts)}",
                    where,
                ]
            )
            results.append(
                dict(model=name, setting=label, options=options, perplexity=ppl, max_logprob_diff=diff)
                | dict(greedy_same=same, parted_at=[p for p in parts if p is not None])
            )
            print(" | ".join(rows[-1]), flush=True)
    heads = ["model", "setting", "perplexity", "max |logprob - ref|", "greedy same", "parted at"]
    print(markdown_table(heads, rows))
    write_results(args, results)


if __name__ == "__main__":
    main()
