"""Where the engine's decode step spends its time: XLA:CPU's thunks, summed per layer, from a profiler trace.

    JAX_PLATFORMS=cpu python bench/profile_decode_step.py [--model PATH] [--rows 1] [--keys 1024]
        [--packed] [--kv-cache-dtype float16] [--set MODULE.ATTR=VALUE ...] [--calls 3] [--hlo PATH]

The step is `ModelRunner.steps.decode`, compiled ahead of time on synthetic block tables (a shuffled pool,
every row `--keys` long) as `bench_decode_step.py` does, then called `--calls` times under
`jax.profiler.trace`. Each XLA:CPU thunk (a fusion, a YNNPACK fusion, a copy, a conditional and the
thunks inside it) is one trace event named after its HLO instruction: the table lists the names with the
most time, as microseconds per layer (a call's total over layers x decode steps x calls) and how many
times a layer runs each. `--hlo` writes the optimized HLO, to read what a name computes. `--set` changes
module settings before tracing (e.g. `pallas_kernels.read_widths.STEPS_PER_OCTAVE=0`: the whole table).
Nested thunks count inside their conditional or loop too, so the column does not add up to the step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
from pathlib import Path

from bench_decode_step import parse_variant
from common import RESULTS, markdown_table, write_json

# Host-side trace events, not XLA thunks.
_NOT_THUNKS = ("ThunkExecutor", "ThreadpoolListener", "PjitFunction", "end: ", "$")


def thunk_times(trace_dir: Path) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and event count per thunk name in the trace under `trace_dir`."""
    (path,) = trace_dir.glob("**/*perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith(_NOT_THUNKS) and "::" not in name:
            total[name] += e["dur"]
            count[name] += 1
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--keys", type=int, default=1024, help="context length of every row")
    ap.add_argument("--steps", type=int, default=4, help="decode tokens per call")
    ap.add_argument("--calls", type=int, default=3, help="calls traced (after two untraced)")
    ap.add_argument("--kv-cache-dtype", default=None)
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo", type=Path, help="write the compiled step's HLO here")
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_step_profile.json")
    args = ap.parse_args()

    import jax
    import numpy as np

    from jaxrs import LLM, SamplingParams

    for module, attr, value in parse_variant("set:" + ",".join(args.set))[1][0]:
        setattr(module, attr, value)
    llm = LLM(
        args.model,
        kv_cache_dtype=args.kv_cache_dtype,
        packed=args.packed,
        max_num_seqs=args.rows,
        kv_cache_tokens=args.rows * (args.keys + args.steps + 16),
        max_model_len=args.keys + args.steps,
        prefix_caching=False,
        layer_loop="scan",
    )
    runner = llm.engine.runner
    batch, flags = runner.profile_batch(SamplingParams(temperature=0), args.rows)
    rng = np.random.default_rng(0)
    blocks = -(-(args.keys + args.steps) // runner.block_size)
    tables = np.zeros((args.rows, runner.width(blocks, decode=True)), np.int32)
    tables[:, :blocks] = rng.permutation(args.rows * blocks).reshape(args.rows, blocks)
    inputs = (
        rng.integers(0, runner.cfg.vocab_size, args.rows).astype(np.int32),
        np.full(args.rows, args.keys - 1, np.int32),
        tables,
        np.ones(args.rows, bool),
        batch,
        np.int32(args.steps),
    )
    step = runner.steps.decode.lower(
        runner.params,
        runner.kv,
        *inputs,
        cfg=runner.cfg,
        kernels=runner.kernels,
        flags=flags,
        max_steps=args.steps,
    ).compile()
    if args.hlo:
        args.hlo.write_text(step.as_text())

    def call() -> None:
        out, runner.kv = step(runner.params, runner.kv, *inputs)
        jax.block_until_ready(out)

    call(), call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.calls):
                call()
        total, count = thunk_times(Path(trace_dir))
    layers = runner.cfg.num_layers * args.steps * args.calls
    rows = [
        {"thunk": name, "us_per_layer": us / layers, "per_layer": count[name] / layers}
        for name, us in total.most_common(args.top)
    ]
    table_keys = tables.shape[1] * runner.block_size
    print(
        f"{llm.engine.model_name}, {args.rows} rows x {args.keys} keys (table {table_keys}), "
        f"{args.steps} steps a call, {args.calls} calls traced, settings {args.set or 'as they are'}\n"
    )
    print(
        markdown_table(
            ["thunk", "us a layer", "runs a layer"],
            [[r["thunk"], f"{r['us_per_layer']:.1f}", f"{r['per_layer']:.2f}"] for r in rows],
        )
    )
    write_json(args.out, {"model": llm.engine.source, "args": vars(args), "thunks": rows})


if __name__ == "__main__":
    main()
