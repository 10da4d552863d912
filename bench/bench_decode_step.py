"""The engine's own jitted decode step, timed directly for each layer loop, interleaved in one process.

    python bench/bench_decode_step.py [--model PATH] [--rows 1 8 32] [--keys 128 512]
        [--loops scan unrolled] [--kv-cache-dtype float16] [--packed] [--repeats 9] [--batch-invariant-ab]
        [--variant LABEL[:MODULE.ATTR=VALUE|XLA_OPTION=VALUE,...] ...]
        [--engine-variant LABEL:MODULE.ATTR=VALUE,... ...]

On XLA:CPU an isolated kernel benchmark does not predict the engine's step (YNNPACK fuses across op
boundaries differently there), so A/Bs of the model code are made on the step itself: one engine per
layer loop (`EngineConfig.layer_loop`), each step compiled ahead of time on synthetic block tables
(a shuffled pool, every row `--keys` long), then called in turn, `--steps` decode tokens a call. Reports
ms a decode step (median; and the process's CPU time a step, which contention swings less), tokens/s
over the rows, the ratio to the first loop, the compile seconds, the
resident memory the compiled step added, and XLA's count of its temporary buffers. `--variant` traces
each loop's step again under module settings read when tracing (e.g.
`whole:pallas_kernels.read_widths.STEPS_PER_OCTAVE=0`), other kernels (`f32:kernel.qmatmul=xla`) or with
more step XLA options (`NAME=VALUE`; an empty value drops one), each variant's executable timed in the
same interleaved rounds; a bare LABEL is the code as it is. `--engine-variant` builds each loop's engine
again under module settings read while loading (e.g.
`unsplit:jaxrs.loading.device_layout.SPLIT_LONG_ROWS=False`), its step timed in the same rounds. Writes
bench/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import statistics
import time
from pathlib import Path

from common import RESULTS, markdown_table, write_json


def resident_mib() -> float:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def parse_variant(
    text: str,
) -> tuple[str, tuple[list[tuple[object, str, object]], dict[str, str], dict[str, str]]]:
    """`LABEL[:SETTING,...]` as (label, ([(module, attribute, value)], {xla option: value}, {op: kernel})):
    a setting is `MODULE.ATTR=VALUE` (a Python literal), `kernel.OP=NAME` (the step traced with that
    implementation of an op, e.g. `kernel.qmatmul=xla`) or `XLA_OPTION=VALUE` (the step compiled with that
    option)."""
    label, _, settings = text.partition(":")
    found, options, kernels = [], {}, {}
    for item in filter(None, settings.split(",")):
        target, _, literal = item.partition("=")
        module, _, attr = target.rpartition(".")
        if not module:
            options[target] = literal
        elif module == "kernel":
            kernels[attr] = literal
        else:
            found.append((importlib.import_module(module), attr, ast.literal_eval(literal)))
    return label, (found, options, kernels)


@contextlib.contextmanager
def settings_applied(settings: list[tuple[object, str, object]]):
    """Module `settings` (as `parse_variant` finds them) set for the `with` block, then put back: an engine
    of an `--engine-variant` is loaded under them."""
    saved = [(m, a, getattr(m, a)) for m, a, _ in settings]
    for module, attr, value in settings:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def with_kernels(kernels, chosen: dict[str, str]):
    """The engine's kernel choice `kernels` with a variant's `chosen` ones over it."""
    from jaxrs.ops import Kernels

    return Kernels.from_mapping(dict(kernels.choice) | chosen) if chosen else kernels


def main() -> None:
    from jaxrs.engine.options import LAYER_LOOPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--keys", type=int, nargs="+", default=[128, 512], help="context length of every row")
    ap.add_argument("--loops", nargs="+", default=list(LAYER_LOOPS), choices=LAYER_LOOPS)
    ap.add_argument("--steps", type=int, default=8, help="decode tokens per call")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default=None, help="e.g. float16 (default: the compute dtype)")
    ap.add_argument("--packed", action="store_true", help="keep a GGUF's quantized tensors packed")
    ap.add_argument(
        "--few-rows-ab",
        action="store_true",
        help="each loop also with the packed few-row products off (`qmatmul.CPU_FEW_ROWS = 1`), interleaved",
    )
    ap.add_argument(
        "--batch-invariant-ab",
        action="store_true",
        help="each loop also in the batch-invariant mode (its own engine: batch_invariant=True), interleaved",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL[:MODULE.ATTR=VALUE|XLA_OPTION=VALUE,...]",
        help="each loop also traced under these module settings, interleaved (repeatable)",
    )
    ap.add_argument(
        "--engine-variant",
        action="append",
        default=[],
        metavar="LABEL:MODULE.ATTR=VALUE,...",
        help="each loop also as an engine loaded under these module settings (repeatable)",
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        help="the engine's limit, which sets the widest block table (default: the longest --keys)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_step.json", help="JSON results file")
    args = ap.parse_args()

    import jax
    import numpy as np

    from jaxrs import LLM, SamplingParams
    from jaxrs.engine.runner import jitted_steps, step_xla_options
    from pallas_kernels import qmatmul

    most_rows, most_keys = max(args.rows), max(args.keys) + args.steps

    def engine(loop: str, **more) -> LLM:
        return LLM(
            args.model,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            packed=args.packed,
            max_num_seqs=most_rows,
            kv_cache_tokens=most_rows * (most_keys + 16),
            max_model_len=args.max_model_len or most_keys,
            prefix_caching=False,
            layer_loop=loop,
            **more,
        )

    modes = [("", {})]
    if args.batch_invariant_ab:  # "LOOP invariant": an engine of that loop in the batch-invariant mode
        modes.append((" invariant", {"batch_invariant": True}))
    llms = {loop + tag: engine(loop, **more) for loop in args.loops for tag, more in modes}
    for label, (settings, _, _) in map(parse_variant, args.engine_variant):
        with settings_applied(settings):
            llms.update({f"{loop} {label}": engine(loop) for loop in args.loops})
    runners = {loop: llm.engine.runner for loop, llm in llms.items()}  # the runner's step is the subject
    first = runners[args.loops[0]]
    few_rows = qmatmul.CPU_FEW_ROWS
    if args.few_rows_ab:  # "LOOP whole": the same runner, its step traced with the few-row path off
        runners = {f"{loop}{tag}": r for loop, r in runners.items() for tag in (" whole", "")}
    variants = dict(parse_variant(v) for v in args.variant)
    if variants:  # "LOOP LABEL": the same runner, its step traced under the variant's settings
        runners = {f"{loop} {label}": r for loop, r in runners.items() for label in variants}
    defaults = {(m, a): getattr(m, a) for found, *_ in variants.values() for m, a, _ in found}
    loops = list(runners)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.float32(0)))  # compiler set-up, charged to no loop
    rng = np.random.default_rng(0)
    rows = []
    for b in args.rows:
        batch, flags = first.profile_batch(SamplingParams(temperature=0), b)
        for keys in args.keys:
            blocks = -(-(keys + args.steps) // first.block_size)
            pages = rng.permutation(b * blocks).reshape(b, blocks)
            tokens = rng.integers(0, first.cfg.vocab_size, b).astype(np.int32)
            calls, found, inputs = {}, {}, {}
            for loop, runner in runners.items():
                before, began = resident_mib(), time.perf_counter()
                qmatmul.CPU_FEW_ROWS = 1 if " whole" in loop else few_rows
                for (module, attr), value in defaults.items():
                    setattr(module, attr, value)
                found_settings, options, chosen = variants.get(loop.rpartition(" ")[2], ([], {}, {}))
                for module, attr, value in found_settings:
                    setattr(module, attr, value)
                tables = np.zeros((b, runner.width(blocks, decode=True)), np.int32)  # a setting may widen
                tables[:, :blocks] = pages
                inputs[loop] = (
                    tokens,
                    np.full(b, keys - 1, np.int32),
                    tables,
                    np.ones(b, bool),
                    batch,
                    np.int32(args.steps),
                )
                steps = jitted_steps(step_xla_options(dict(runner.xla_options) | options))
                jax.clear_caches()  # trace again under this setting
                compiled = steps.decode.lower(
                    runner.params,
                    runner.kv,
                    *inputs[loop],
                    cfg=runner.cfg,
                    kernels=with_kernels(runner.kernels, chosen),
                    flags=flags,
                    max_steps=args.steps,
                ).compile()
                runner.kv = compiled(runner.params, runner.kv, *inputs[loop])[1]  # first run: page in
                jax.block_until_ready(runner.kv)
                calls[loop] = compiled
                found[loop] = {
                    "compile_s": time.perf_counter() - began,
                    "resident_mib": resident_mib() - before,
                    "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                    "times": [],
                    "cpu": [],
                }
            for (module, attr), value in defaults.items():
                setattr(module, attr, value)
            for _ in range(args.repeats):
                for loop, runner in runners.items():
                    began, cpu = time.perf_counter(), time.process_time()
                    out, runner.kv = calls[loop](runner.params, runner.kv, *inputs[loop])
                    jax.block_until_ready(out)
                    found[loop]["times"].append(time.perf_counter() - began)
                    found[loop]["cpu"].append(time.process_time() - cpu)
            base = statistics.median(found[loops[0]]["times"])
            for loop, f in found.items():
                call_s = statistics.median(f.pop("times"))
                cpu_s = statistics.median(f.pop("cpu"))
                rows.append(
                    {
                        "rows": b,
                        "keys": keys,
                        "loop": loop,
                        "ms_per_step": 1000 * call_s / args.steps,
                        "cpu_ms_per_step": 1000 * cpu_s / args.steps,
                        "tok_s": b * args.steps / call_s,
                        "ratio": base / call_s,
                        **f,
                    }
                )
                ms, cpu_ms = rows[-1]["ms_per_step"], rows[-1]["cpu_ms_per_step"]
                print(f"{b} rows, {keys} keys, {loop}: {ms:.1f} ms a step, CPU {cpu_ms:.1f}", flush=True)

    engine = llms[args.loops[0]].engine
    print(
        f"\n{engine.model_name}, {args.steps} decode steps a call, median of {args.repeats} calls, "
        f"{jax.default_backend()}, dtype {args.dtype}, KV cache {args.kv_cache_dtype or 'the default'}"
        f"{', packed' if args.packed else ''}"
    )
    print(
        markdown_table(
            ["rows", "keys", "loop", "ms a step", "CPU ms a step", "tok/s", "ratio", "compile s"]
            + ["resident MiB added", "temp MiB"],
            [
                [
                    r["rows"],
                    r["keys"],
                    r["loop"],
                    f"{r['ms_per_step']:.1f}",
                    f"{r['cpu_ms_per_step']:.1f}",
                    f"{r['tok_s']:.1f}",
                    f"{r['ratio']:.2f}x",
                    f"{r['compile_s']:.1f}",
                    f"{r['resident_mib']:.0f}",
                    f"{r['temp_mib']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    write_json(
        args.out,
        {"model": engine.source, "args": vars(args), "backend": jax.default_backend(), "rows": rows},
    )


if __name__ == "__main__":
    main()
