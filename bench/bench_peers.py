"""Peers in one run: jaxrs against llama.cpp, mistral.rs and transformers on the same GGUF, interleaved.

    python bench/bench_peers.py [--model PATH] [--engines jaxrs llamacpp mistralrs transformers]
        [--jaxrs-modes f32 packed] [--passes 3] [--prompt-tokens 512] [--new-tokens 128]
        [--concurrency 8 32] [--threads 2] [--skip-cold] [--out bench/results/peers.json]

Each engine runs in its own process (`peer_worker.py`; llama.cpp and mistral.rs under the interpreters
of the virtual environments `bench/setup_peers.sh` makes, skipped with a note when absent), loaded once
and kept alive. Every pass asks each engine in turn for the same measurements, so the drifts of a shared
machine fall on all of them alike. Pass 0 warms up (jaxrs compiles its step shapes) and is not counted;
the figures are medians of the passes after it. Greedy, EOS ignored; every engine gets the same token
ids except mistral.rs, which takes the decoded text and tokenizes it itself.

- prefill tok/s: prompt tokens / time to the first token, for a --prompt-tokens prompt; TTFT: that time;
- decode tok/s: the remaining --new-tokens - 1 tokens of that sequence / their time;
- aggregate tok/s at N: N short distinct prompts, --new-tokens each, submitted at once; generated tokens /
  wall time. llama.cpp (one sequence per `Llama` object) and mistral.rs (its `Runner` takes one caller
  at a time) serve them one after another: they run --sequential-requests prompts back to back, and that
  rate stands for every N (marked "seq"); transformers runs one batched, left-padded `generate`;
- peak MiB: the live worker's peak resident memory at the end of the run;
- cold s: a fresh process to its first generated token (16-token prompt); for jaxrs also with a warm
  persistent compilation cache (a folder filled by one cold run first).

Prints the table and the ratios (> 1: jaxrs better), writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, fmt, machine_facts, markdown_table, median, prompt_ids, request_text, write_json

WORKER = Path(__file__).parent / "peer_worker.py"
PEERS = Path(os.environ.get("JAXRS_PEERS", Path.home() / ".cache" / "jaxrs" / "peers"))
LABELS = {"llamacpp": "llama.cpp", "mistralrs": "mistral.rs", "transformers": "transformers"}
COLD_PROMPT = 16
BLOCK = 16  # jaxrs KV block size


class WorkerDied(RuntimeError):
    pass


class Worker:
    """A child process speaking peer_worker's JSON-lines protocol; every wait is bounded."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise WorkerDied(f"no answer within {timeout:.0f} s (log: {self.log})") from None
        if line is None:
            code = self.proc.wait()
            tail = self.log.read_text()[-1500:]
            raise WorkerDied(f"exited with {describe_exit(code)} (log: {self.log}):\n{tail}")
        return json.loads(line)

    def ask(self, timeout: float, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.read(timeout)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self, timeout: float = 30) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


@dataclasses.dataclass
class Row:
    """One engine configuration, measured in every pass."""

    label: str
    engine: str
    python: str
    args: list[str]
    env: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    worker: Worker | None = None
    ready: dict = dataclasses.field(default_factory=dict)
    passes: list[dict] = dataclasses.field(default_factory=list)
    cache_dir: str | None = None  # jaxrs: the persistent compilation cache for the warm cold start

    @property
    def is_jaxrs(self) -> bool:
        return self.engine == "jaxrs"

    def command(self, model: str) -> list[str]:
        return [self.python, str(WORKER), self.engine, "--model", model, *self.args]


def peer_python(engine: str) -> Path:
    return PEERS / engine / "bin" / "python"


def build_rows(args: argparse.Namespace, skipped: dict[str, str]) -> list[Row]:
    """The rows to measure: one per jaxrs mode, then each installed peer."""
    common = ["--threads", str(args.threads), "--ctx", str(args.ctx)]
    rows = []
    for engine in args.engines:
        if engine == "jaxrs":
            for mode in args.jaxrs_modes:
                extra = ["--mode", mode, "--max-seqs", str(max(args.concurrency)), "--kv-tokens"]
                rows.append(
                    Row(f"jaxrs {mode}", "jaxrs", sys.executable, common + extra + [str(args.kv_tokens)])
                )
        elif engine == "transformers":
            if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
                rows.append(Row("transformers", engine, sys.executable, list(common)))
            else:
                skipped[engine] = "transformers or torch is not installed in this environment"
        elif peer_python(engine).is_file():
            rows.append(Row(LABELS[engine], engine, str(peer_python(engine)), list(common)))
        else:
            skipped[engine] = (
                f"not installed at {peer_python(engine)} (run: bash bench/setup_peers.sh {engine})"
            )
    return rows


def thread_env(threads: int) -> dict:
    """Every engine gets the same thread budget (XLA:CPU takes one thread per core regardless)."""
    n = str(threads)
    return dict(
        os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, RAYON_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false"
    )


def cold_start(row: Row, model: str, prompt: dict, env: dict, log: Path, timeout: float) -> float:
    """Seconds from spawning a fresh worker to its first generated token."""
    start = time.perf_counter()
    worker = Worker(row.command(model) + ["--cold", json.dumps(prompt)], env, log)
    try:
        worker.read(timeout)
        return time.perf_counter() - start
    finally:
        worker.close()


def probe_llamacpp(row: Row, model: str, prompt: dict, env: dict, log: Path) -> None:
    """llama.cpp built for this CPU may use AMX tiles that a virtual machine does not allow (a general
    protection fault at `ldtilecfg`): if a first token crashes, run it with plain weight buffers."""
    try:
        cold_start(row, model, prompt, env, log, timeout=300)
    except WorkerDied as e:
        if "signal" not in str(e):
            raise
        row.args.append("--no-extra-bufts")
        row.notes.append("crashed with its extra buffer types (AMX, repacked weights): run without them")


def measure(row: Row, args: argparse.Namespace, work: dict, warmup: bool) -> dict:
    """One pass of one engine: the long prompt, then each concurrency (once, if it serves sequentially)."""
    timeout = args.timeout
    result: dict = {}
    if warmup and not row.ready["concurrent"]:  # nothing to compile: touch the code paths, quickly
        row.worker.ask(timeout, op="single", ids=work["ids"][:16], text=work["cold"]["text"], new_tokens=4)
        return result
    single = row.worker.ask(
        timeout, op="single", ids=work["ids"], text=work["text"], new_tokens=args.new_tokens
    )
    result["prefill_tok_s"] = single["prompt_tokens"] / single["ttft_s"]
    result["ttft_ms"] = 1e3 * single["ttft_s"]
    result["prompt_tokens"] = single["prompt_tokens"]
    if single["decode_tokens"] > 0 and single["decode_s"] > 0:
        result["decode_tok_s"] = single["decode_tokens"] / single["decode_s"]
    counts = (
        args.concurrency
        if row.ready["concurrent"]
        else [min(max(args.concurrency), args.sequential_requests)]
    )
    for n in counts:
        new = min(args.new_tokens, 16) if warmup and not row.is_jaxrs else args.new_tokens
        out = row.worker.ask(
            timeout, op="batch", prompts=work["prompts"][:n], texts=work["texts"][:n], new_tokens=new
        )
        rate = out["new_tokens"] / out["wall_s"]
        for c in args.concurrency if not row.ready["concurrent"] else [n]:
            result[f"agg_tok_s@{c}"] = rate
    return result


def measure_cold(row: Row, args: argparse.Namespace, work: dict, env: dict, log: Path) -> dict:
    result = {}
    off = dict(env, JAXRS_COMPILATION_CACHE="off")
    result["cold_s"] = cold_start(row, args.model, work["cold"], off, log, args.timeout)
    if row.cache_dir:
        cached = dict(env, JAXRS_COMPILATION_CACHE=row.cache_dir)
        result["cold_cached_s"] = cold_start(row, args.model, work["cold"], cached, log, args.timeout)
    return result


def prepare_work(args: argparse.Namespace) -> dict:
    """Token ids (and text, for mistral.rs) of the long prompt, the short prompts and the cold prompt,
    from jaxrs's reading of the model's tokenizer."""
    tok = load_tokenizer(args.model)
    ids = prompt_ids(tok, args.prompt_tokens)
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens")
    n = max(args.concurrency)
    texts = [request_text(i) for i in range(n)]
    return {
        "ids": ids,
        "text": tok.decode(ids),
        "prompts": [tok.encode(t) for t in texts],
        "texts": texts,
        "cold": {"ids": ids[:COLD_PROMPT], "text": tok.decode(ids[:COLD_PROMPT])},
    }


def load_tokenizer(model: str):
    from jaxrs.loading import resolve_source
    from jaxrs.tokenizer import Tokenizer

    kind, path = resolve_source(model)
    if kind == "hf":
        return Tokenizer.from_hf_folder(path)
    from jaxrs.loading.gguf_reader import open_gguf, read_metadata
    from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_metadata(open_gguf(path)), path)


def summarize(rows: list[Row], args: argparse.Namespace) -> dict[str, dict]:
    keys = ["prefill_tok_s", "ttft_ms", "decode_tok_s", *(f"agg_tok_s@{c}" for c in args.concurrency)]
    keys += ["cold_s", "cold_cached_s", "load1"]
    table = {}
    for row in rows:
        medians = {k: median(p.get(k) for p in row.passes) for k in keys}
        medians["peak_mib"] = row.ready.get("max_rss_mib")
        table[row.label] = medians
    return table


COLUMNS = [  # key, header, digits, higher is better
    ("prefill_tok_s", "prefill tok/s", 1, True),
    ("ttft_ms", "TTFT ms", 0, False),
    ("decode_tok_s", "decode tok/s", 1, True),
]
TAIL = [
    ("peak_mib", "peak MiB", 0, False),
    ("cold_s", "cold s", 1, False),
    ("cold_cached_s", "cold s, warm cache", 1, False),
]


def columns(args: argparse.Namespace) -> list[tuple[str, str, int, bool]]:
    agg = [(f"agg_tok_s@{c}", f"aggregate tok/s @{c}", 1, True) for c in args.concurrency]
    return COLUMNS + agg + TAIL


def print_tables(rows: list[Row], table: dict, args: argparse.Namespace) -> str:
    cols = columns(args)
    lines = []
    for row in rows:
        cells = [row.label]
        for key, _, digits, _ in cols:
            cell = fmt(table[row.label].get(key), digits)
            if key.startswith("agg") and not row.ready.get("concurrent", True) and cell != "—":
                cell += " (seq)"
            cells.append(cell)
        lines.append(cells)
    text = markdown_table(["engine", *(c[1] for c in cols)], lines)
    ours = [r for r in rows if r.is_jaxrs]
    peers = [r for r in rows if not r.is_jaxrs]
    if ours and peers:
        ratio_cols = [c for c in cols if c[0] != "cold_cached_s"]
        ratio_rows = []
        for a in ours:
            for b in peers:
                cells = [f"{a.label} vs {b.label}"]
                for key, _, _, higher in ratio_cols:
                    x, y = table[a.label].get(key), table[b.label].get(key)
                    cells.append("—" if not x or not y else f"{(x / y if higher else y / x):.2f}x")
                ratio_rows.append(cells)
        text += "\n\nRatios (> 1: jaxrs better, i.e. faster or smaller):\n"
        text += markdown_table(["", *(c[1] for c in ratio_cols)], ratio_rows)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or model folder (default: the demo GGUF)")
    ap.add_argument("--engines", nargs="+", default=["jaxrs", "llamacpp", "mistralrs", "transformers"])
    ap.add_argument(
        "--jaxrs-modes",
        nargs="+",
        default=["f32", "packed"],
        help="f32 bf16 packed packed-bf16 f32-kv16 packed-kv16, each also with -ynndot (an XLA option A/B) "
        "or -unrolled (layers unrolled)",
    )
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests a sequential engine runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true", help="no cold-start measurements")
    ap.add_argument("--timeout", type=float, default=900, help="seconds any one answer may take")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args()
    began = time.perf_counter()

    from jaxrs.loading import resolve_source

    args.model = str(resolve_source(args.model)[1])
    work = prepare_work(args)
    short = max(len(p) for p in work["prompts"])
    args.ctx = max(args.prompt_tokens, short) + args.new_tokens + BLOCK
    blocks = -(-(short + args.new_tokens) // BLOCK)
    args.kv_tokens = max(args.ctx, max(args.concurrency) * blocks * BLOCK) + BLOCK * max(args.concurrency)
    skipped: dict[str, str] = {}
    rows = build_rows(args, skipped)
    for engine, why in skipped.items():
        print(f"skipping {engine}: {why}")
    env = thread_env(args.threads)
    logs = Path(tempfile.mkdtemp(prefix="jaxrs-peers-"))
    print(f"model {Path(args.model).name}; worker logs in {logs}")
    signal.signal(signal.SIGTERM, stopped)  # so the workers are closed below
    grace = 2  # seconds a worker gets to finish when the run is cut short
    try:
        for row in rows:
            start_row(row, args, work, env, logs)
        for p in range(args.passes + 1):
            run_pass(p, rows, args, work, env, logs)
            if p:  # what is measured so far survives an interrupted run
                save(args, rows, skipped, time.perf_counter() - began, quiet=p < args.passes)
        grace = 30
    finally:
        for row in rows:
            if row.worker is not None:
                row.worker.close(grace)


def stopped(signum: int, frame: object) -> None:
    print("stopped by SIGTERM", flush=True)
    sys.exit(1)


def log_path(logs: Path, row: Row, suffix: str = "") -> Path:
    return logs / f"{row.label.replace(' ', '-')}{suffix}.log"


def start_row(row: Row, args: argparse.Namespace, work: dict, env: dict, logs: Path) -> None:
    """Probe llama.cpp, fill jaxrs's compilation cache for its warm cold start, then start the live worker."""
    log = log_path(logs, row)
    if row.engine == "llamacpp":
        probe_llamacpp(row, args.model, work["cold"], env, log)
    if row.is_jaxrs and not args.skip_cold:
        row.cache_dir = str(logs / f"xla-{row.label.replace(' ', '-')}")
        filling = dict(env, JAXRS_COMPILATION_CACHE=row.cache_dir)
        try:
            cold_start(row, args.model, work["cold"], filling, log, args.timeout)
        except WorkerDied as e:
            row.notes.append(f"filling the compilation cache failed: {str(e).splitlines()[0]}")
            row.cache_dir = None
    start = time.perf_counter()
    row.worker = Worker(row.command(args.model), dict(env, JAXRS_COMPILATION_CACHE="off"), log)
    try:
        row.ready = row.worker.read(args.timeout)
    except WorkerDied as e:  # reported as a finding; the other engines still run
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        row.notes.append(f"could not load the model: {last}")
        print(f"{row.label}: could not load the model: {last}")
        row.worker = None
        return
    print(f"{row.label}: loaded in {time.perf_counter() - start:.1f} s")


def run_pass(p: int, rows: list[Row], args: argparse.Namespace, work: dict, env: dict, logs: Path) -> None:
    """Pass `p` (0: warm-up) over every live engine in turn, then each one's peak memory so far."""
    for row in rows:
        if row.worker is None:
            continue
        start = time.perf_counter()
        try:
            result = measure(row, args, work, warmup=p == 0)
            if p and not args.skip_cold:
                result |= measure_cold(row, args, work, env, log_path(logs, row, ".cold"))
            row.ready["max_rss_mib"] = row.worker.ask(60, op="stats")["max_rss_mib"]
        except (WorkerDied, RuntimeError) as e:
            row.notes.append(f"pass {p}: {e}")
            print(f"{row.label}, pass {p}: failed: {e}")
            if isinstance(e, WorkerDied):
                row.worker = None
            continue
        result["load1"] = os.getloadavg()[0]  # the machine's 1-minute load, this engine's own included
        if p:
            row.passes.append(result)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in result.items() if isinstance(v, float))
        tag = f"pass {p}" + (" (warm-up)" if not p else "")
        print(f"{tag} {row.label}: {time.perf_counter() - start:.0f} s  {shown}", flush=True)


def save(args: argparse.Namespace, rows: list[Row], skipped: dict, wall: float, quiet: bool) -> None:
    """Medians of the passes so far: JSON always, the tables and notes unless `quiet`."""
    table = summarize(rows, args)
    text = print_tables(rows, table, args)
    done = len(max((r.passes for r in rows), key=len, default=[]))
    if not quiet:
        print(
            f"\n{Path(args.model).name}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
            f"greedy, {args.threads} threads, median of {done} passes (after a warm-up pass)\n"
        )
        print(text)
        loads = ", ".join(f"{r.label} {fmt(table[r.label]['load1'])}" for r in rows)
        print(f"\n1-minute load after each measurement, median (this run adds about {args.threads}): {loads}")
        for row in rows:
            for note in row.notes:
                print(f"note, {row.label}: {note}")
        print(f"\nwhole run: {wall / 60:.1f} min")
    row_info = {
        r.label: {
            "engine": r.engine,
            "medians": table[r.label],
            "passes": r.passes,
            "concurrent": r.ready.get("concurrent"),
            "load_s": r.ready.get("load_s"),
            "versions": r.ready.get("versions"),
            "notes": r.notes,
        }
        for r in rows
    }
    payload = {"model": args.model, "args": vars(args), "machine": machine_facts(), "rows": row_info}
    write_json(args.out, payload | {"skipped": skipped, "passes_done": done, "table": text, "wall_s": wall})


if __name__ == "__main__":
    main()
