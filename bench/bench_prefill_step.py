"""The engine's prefill step alone, one prompt chunk, under variants of the code's settings, interleaved.

    JAX_PLATFORMS=cpu python bench/bench_prefill_step.py [--model M.gguf] [--tokens 512 2048] [--repeats 5]
        [--variant LABEL[:MODULE.ATTR=VALUE|XLA_OPTION=VALUE,...] ...]
        [--engine-variant LABEL:MODULE.ATTR=VALUE,... ...]

The runner of an `LLM` (the demo model unless `--model`) at its defaults (packed GGUF, float16 cache on CPU;
prefix caching off) compiles its prefill step for one sequence of `--tokens` prompt tokens from position 0
(the chunk padded as the engine pads it) once under each variant, as `bench_decode_step.py --variant` does for
decode: the base settings first, then each variant's module attributes set while that step is traced (e.g.
`kt256:pallas_kernels.tiled_attention.KEY_TILE=256`, or `pow2:jaxrs.engine.runner.CHUNK_STEP=4096`: the chunk
padded to a power of two), its kernels (`f32:kernel.qmatmul=xla`) or its XLA options. The calls then run
interleaved, variant by variant, `--repeats` times; medians of wall and process CPU time (both threads,
steadier on a shared machine) per call, and prompt tokens per wall second. The last position's logits under
each variant are compared with the base's (the greatest difference is printed). `--engine-variant` loads a
second engine under module settings read while loading (e.g.
`unsplit:jaxrs.loading.device_layout.SPLIT_LONG_ROWS=False`), its step timed in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from bench_decode_step import parse_variant, settings_applied, with_kernels
from common import RESULTS, markdown_table, write_results


def chunk_inputs(runner, prompt: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
    """Token ids, attention metadata and last index of `prompt` as one chunk from position 0, padded as the
    runner pads a chunk (`chunk_len`), its table as wide as the runner makes it."""
    tokens = len(prompt)
    t = runner.chunk_len(tokens)
    blocks = -(-tokens // runner.block_size)
    meta = runner._metadata([(list(range(blocks)), 0, tokens, None)], 1, t, runner.width(blocks))
    ids = np.zeros((1, t), np.int32)
    ids[0, :tokens] = prompt
    return ids, meta, np.int32([tokens - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL[:SETTING,...]")
    ap.add_argument("--engine-variant", action="append", default=[], metavar="LABEL:SETTING,...")
    ap.add_argument("--out", type=Path, default=RESULTS / "prefill_step.json")
    args = ap.parse_args()

    from jaxrs import LLM, SamplingParams
    from jaxrs.engine.runner import jitted_steps, logits_at, step_xla_options

    most = max(args.tokens)

    def engine() -> LLM:
        return LLM(args.model, max_model_len=most + 16, kv_cache_tokens=most + 64, prefix_caching=False)

    llm = engine()
    variants = {"base": ([], {}, {})} | dict(parse_variant(v) for v in args.variant)
    runners = {label: llm.engine.runner for label in variants}  # trace-time variants share the engine
    for label, (settings, _, _) in map(parse_variant, args.engine_variant):
        with settings_applied(settings):
            runners[label] = engine().engine.runner
        variants[label] = ([], {}, {})
    runner = llm.engine.runner
    defaults = {(m, a): getattr(m, a) for found, *_ in variants.values() for m, a, _ in found}
    rng = np.random.default_rng(0)
    rows, results = [], []
    for tokens in args.tokens:
        prompt = rng.integers(0, runner.cfg.vocab_size, tokens)
        batch, flags = runner.profile_batch(SamplingParams(temperature=0), 1)
        calls, inputs, checks, times, padded = {}, {}, {}, {}, {}
        for label, (found, options, chosen) in variants.items():
            runner = runners[label]
            statics = dict(cfg=runner.cfg, kernels=with_kernels(runner.kernels, chosen))
            for (module, attr), value in defaults.items():
                setattr(module, attr, value)
            for module, attr, value in found:
                setattr(module, attr, value)
            inputs[label] = chunk_inputs(runner, prompt)  # padded under this variant's settings
            padded[label] = inputs[label][0].shape[1]
            xla = step_xla_options(dict(runner.xla_options) | options)
            jax.clear_caches()  # trace again under this variant's settings
            step = jitted_steps(xla).prefill
            calls[label] = step.lower(
                runner.params, runner.kv, *inputs[label], batch, flags=flags, **statics
            ).compile()
            logits = jax.jit(
                lambda p, kv, ids, meta, last, kernels=statics["kernels"], cfg=runner.cfg: logits_at(
                    p, cfg, kernels, kv, ids, meta, last
                )[0],
                compiler_options=dict(xla) or None,
            )
            checks[label] = np.asarray(logits(runner.params, runner.kv, *inputs[label]))
            runner.kv = calls[label](runner.params, runner.kv, *inputs[label], batch)[1]  # page in
            times[label] = []
        for (module, attr), value in defaults.items():
            setattr(module, attr, value)
        for _ in range(args.repeats):
            for label, call in calls.items():
                runner = runners[label]
                began, cpu = time.perf_counter(), time.process_time()
                out, runner.kv = call(runner.params, runner.kv, *inputs[label], batch)
                jax.block_until_ready(out)
                times[label].append((time.perf_counter() - began, time.process_time() - cpu))
        for label, ts in times.items():
            wall = statistics.median(w for w, _ in ts)
            cpu = statistics.median(c for _, c in ts)
            diff = float(np.max(np.abs(checks[label] - checks["base"])))
            t = padded[label]
            rows.append(
                [
                    str(tokens),
                    str(t),
                    label,
                    f"{wall:.3f}",
                    f"{cpu:.3f}",
                    f"{tokens / wall:.0f}",
                    f"{diff:.2e}",
                ]
            )
            results.append(
                dict(tokens=tokens, padded=t, variant=label, wall_s=wall, cpu_s=cpu, logit_diff=diff)
            )
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n{llm.engine.model_name}, prefill step, median of {args.repeats} calls each, interleaved")
    heads = ["tokens", "padded", "variant", "wall s", "cpu s", "tok/s (wall)", "max |logit - base|"]
    print(markdown_table(heads, rows))
    write_results(args, results)


if __name__ == "__main__":
    main()
