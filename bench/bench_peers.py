"""Peers in one run: jaxrs against llama.cpp, mistral.rs and transformers on the same GGUF, interleaved.

    python bench/bench_peers.py [--model PATH] [--engines jaxrs llamacpp mistralrs transformers]
        [--jaxrs-modes f32 packed] [--jaxrs-checkout LABEL=PATH ...] [--passes 3] [--prompt-tokens 512]
        [--prompt-lengths 2048 6000] [--prefill-repeats 1] [--new-tokens 128] [--concurrency 8 32]
        [--threads 2] [--skip-cold] [--skip-warmup] [--out bench/results/peers.json]

Each engine runs in its own process (`peer_worker.py`; llama.cpp and mistral.rs under the interpreters
of the virtual environments `bench/setup_peers.sh` makes, skipped with a note when absent), loaded once
and kept alive. Every pass asks each engine in turn for the same measurements, so the drifts of a shared
machine fall on all of them alike; passes alternate the order (as listed, then reversed, ...). Pass 0
warms up (jaxrs compiles its step shapes) and is not counted; the figures are medians of the passes after
it. Greedy, EOS ignored; every engine gets the same token ids except mistral.rs, which takes the decoded
text and tokenizes it itself.

A/B of two jaxrs checkouts, the code before a change against the code after it (here: this tree against
commit 5f520ec), interleaved in the same run:

    git worktree add --detach /tmp/jaxrs-base 5f520ec
    python bench/bench_peers.py --jaxrs-checkout base=/tmp/jaxrs-base --jaxrs-checkout new=. \
        --engines jaxrs@base jaxrs@new --jaxrs-modes f32 --passes 3 --prompt-tokens 512 \
        --new-tokens 128 --concurrency 32 --out bench/results/ab.json

`--jaxrs-checkout LABEL=PATH` (repeatable) makes engine `jaxrs@LABEL`: jaxrs workers whose `import jaxrs`
finds PATH's package (PATH first on PYTHONPATH), a row per --jaxrs-modes mode, labelled `jaxrs@LABEL`
(`jaxrs@LABEL MODE` with several modes). The worker script is PATH's own bench/peer_worker.py if it
speaks this tree's protocol version (`PROTOCOL` in peer_worker.py) or a later one, else this tree's,
which drives jaxrs as of commit 5f520ec and later (a note names the script each row ran, the checkout's
commit, and whether its jaxrs/ has uncommitted changes). Without --engines the checkouts take the place
of the in-tree `jaxrs` rows. The first checkout given is the base: every other one gets a row of ratios
against it, mode by mode.

- prefill tok/s: prompt tokens / time to the first token, for a --prompt-tokens prompt; TTFT: that time;
  with --prefill-repeats R, the median of R such prompts a pass (the first the decode's, then R - 1 with
  one token generated), since one time to first token swings more than a decode's hundred steps;
- prefill tok/s @N (--prompt-lengths N ...): the same for the first N tokens of the prompt text, one
  token generated: long prompts, whose attention grows with the square of their length;
- decode tok/s: the remaining --new-tokens - 1 tokens of that sequence / their time;
- aggregate tok/s at N: N short distinct prompts, --new-tokens each, submitted at once; generated tokens /
  wall time. llama.cpp (one sequence per `Llama` object) and mistral.rs (its `Runner` takes one caller
  at a time) serve them one after another: they run --sequential-requests prompts back to back, and that
  rate stands for every N (marked "seq"); transformers runs one batched, left-padded `generate`;
- decode host % (jaxrs): the share of the decode time above spent outside the runner's step calls, i.e.
  host time per decode call / its wall time (`ModelRunner.device_seconds` counts the time inside a call:
  dispatch, device, transfer back); host % @N: the same over the whole batch at the largest N (its
  prefill calls included). The target is under 1%;
- peak MiB: the live worker's peak resident memory at the end of the run;
- cold s: a fresh process to its first generated token (16-token prompt); for jaxrs also with a warm
  persistent compilation cache (a folder filled by one cold run first);
- warm-up s (shapes) (jaxrs): a fresh process's `LLM.warmup()`, what `LLM(..., warmup=True)` runs, with
  the compilation cache off: every step shape of the live worker's configuration (max_num_seqs the
  largest --concurrency, max_model_len the prompt + new tokens + a block; at the A/B command's sizes that
  is a 32-sequence, 656-token server's set) for the greedy and sampled profiles, decode at 1 and 8 steps;
  the shapes in brackets (the engine's "warm-up: N shapes" log line). Once a counted pass (--skip-warmup:
  never).

Prints the table and the ratios (> 1: jaxrs better; the A/B rows: the later checkout better), writes JSON
(--out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, fmt, machine_facts, markdown_table, median, prompt_ids, request_text, write_json
from peer_worker import PROTOCOL

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
    script: Path = WORKER
    mode: str | None = None  # jaxrs
    checkout: dict | None = None  # a --jaxrs-checkout row: label, path, commit, worker script

    @property
    def is_jaxrs(self) -> bool:
        return self.engine == "jaxrs"

    def command(self, model: str) -> list[str]:
        return [self.python, str(self.script), self.engine, "--model", model, *self.args]

    def environ(self, env: dict) -> dict:
        """`env` with this row's own variables (a checkout's PYTHONPATH) over it."""
        return dict(env, **self.env)


def peer_python(engine: str) -> Path:
    return PEERS / engine / "bin" / "python"


def parse_checkout(text: str) -> tuple[str, Path]:
    """--jaxrs-checkout's LABEL=PATH: a label for the rows and a folder holding a jaxrs package."""
    label, sep, path = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", label) or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, LABEL of letters, digits, . _ -: {text!r}")
    folder = Path(path).expanduser().resolve()
    if not (folder / "jaxrs" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{folder} holds no jaxrs package (jaxrs/__init__.py)")
    return label, folder


def worker_protocol(script: Path) -> int:
    """The protocol version a peer_worker.py speaks (1: written before the versions were numbered)."""
    found = re.search(r"^PROTOCOL = (\d+)", script.read_text(), re.MULTILINE)
    return int(found.group(1)) if found else 1


def checkout_worker(folder: Path) -> tuple[Path, str]:
    """The worker script for a checkout's rows: its own if it speaks this protocol or a later one (it knows
    its jaxrs best), else this tree's; and the reason, for the notes."""
    own = folder / "bench" / "peer_worker.py"
    if not own.is_file():
        return WORKER, f"worker {WORKER} (the checkout has no bench/peer_worker.py)"
    if own.resolve() == WORKER.resolve():
        return WORKER, f"worker {WORKER}"
    if (version := worker_protocol(own)) < PROTOCOL:
        return WORKER, f"worker {WORKER} (the checkout's speaks protocol {version}, this one {PROTOCOL})"
    return own, f"its own worker, protocol {version}"


def describe_checkout(folder: Path) -> dict:
    """The checkout's commit and whether its jaxrs/ differs from it (None where git cannot tell)."""

    def git(*args: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=60
            )
            if done.returncode == 0:
                return done.stdout.strip()
        return None

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "jaxrs")
    return {
        "path": str(folder),
        "commit": git("rev-parse", "--short=10", "HEAD"),
        "jaxrs_changed": None if changed is None else bool(changed),
    }


def jaxrs_row(label: str, mode: str, args: argparse.Namespace, common: list[str]) -> Row:
    extra = ["--mode", mode, "--max-seqs", str(max(args.concurrency)), "--kv-tokens", str(args.kv_tokens)]
    return Row(label, "jaxrs", sys.executable, common + extra, mode=mode)


def checkout_rows(label: str, folder: Path, args: argparse.Namespace, common: list[str]) -> list[Row]:
    """Engine jaxrs@LABEL: a row per jaxrs mode, its workers importing the checkout's jaxrs."""
    script, how = checkout_worker(folder)
    info = describe_checkout(folder) | {"label": label, "worker": str(script)}
    if info["commit"] is None:
        where = f"jaxrs from {folder} (no git commit found)"
    else:
        changes = ", with uncommitted changes in jaxrs/" if info["jaxrs_changed"] else ""
        where = f"jaxrs from {folder} at commit {info['commit']}{changes}"
    where += f"; {how}"
    path = os.pathsep.join(p for p in [str(folder), os.environ.get("PYTHONPATH", "")] if p)
    rows = []
    for mode in args.jaxrs_modes:
        suffix = f" {mode}" if len(args.jaxrs_modes) > 1 else ""
        row = jaxrs_row(f"jaxrs@{label}{suffix}", mode, args, common)
        row.script, row.env, row.checkout = script, {"PYTHONPATH": path}, info
        row.notes.append(f"mode {mode}; {where}")
        rows.append(row)
    return rows


def build_rows(args: argparse.Namespace, skipped: dict[str, str]) -> list[Row]:
    """The rows to measure, in --engines order: one per jaxrs mode (of this tree's jaxrs, or of each
    checkout), then each installed peer."""
    common = ["--threads", str(args.threads), "--ctx", str(args.ctx)]
    checkouts = dict(args.jaxrs_checkout)
    rows = []
    for engine in args.engines:
        if engine == "jaxrs":
            rows += [jaxrs_row(f"jaxrs {mode}", mode, args, common) for mode in args.jaxrs_modes]
        elif engine.startswith("jaxrs@"):
            label = engine.removeprefix("jaxrs@")
            rows += checkout_rows(label, checkouts[label], args, common)
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
    worker = Worker(row.command(model) + ["--cold", json.dumps(prompt)], row.environ(env), log)
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
    ttfts = [single["ttft_s"]]
    for _ in range(args.prefill_repeats - 1):
        again = row.worker.ask(timeout, op="single", ids=work["ids"], text=work["text"], new_tokens=1)
        ttfts.append(again["ttft_s"])
    ttft = statistics.median(ttfts)
    result["prefill_tok_s"] = single["prompt_tokens"] / ttft
    result["ttft_ms"] = 1e3 * ttft
    result["prompt_tokens"] = single["prompt_tokens"]
    for n in args.prompt_lengths:
        long = row.worker.ask(
            timeout, op="single", ids=work["long_ids"][:n], text=work["long_texts"][n], new_tokens=1
        )
        result[f"prefill_tok_s@{n}"] = long["prompt_tokens"] / long["ttft_s"]
    if single["decode_tokens"] > 0 and single["decode_s"] > 0:
        result["decode_tok_s"] = single["decode_tokens"] / single["decode_s"]
        if "decode_device_s" in single:  # jaxrs: the host's part of the decode time
            host = single["decode_s"] - single["decode_device_s"]
            result["decode_host_share"] = host / single["decode_s"]
            if single.get("decode_calls"):
                result["decode_host_ms_per_call"] = 1e3 * host / single["decode_calls"]
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
        if "device_s" in out:
            result[f"host_share@{n}"] = 1 - out["device_s"] / out["wall_s"]
    return result


def measure_cold(row: Row, args: argparse.Namespace, work: dict, env: dict, log: Path) -> dict:
    result = {}
    off = dict(env, JAXRS_COMPILATION_CACHE="off")
    result["cold_s"] = cold_start(row, args.model, work["cold"], off, log, args.timeout)
    if row.cache_dir:
        cached = dict(env, JAXRS_COMPILATION_CACHE=row.cache_dir)
        result["cold_cached_s"] = cold_start(row, args.model, work["cold"], cached, log, args.timeout)
    return result


def measure_warmup(row: Row, args: argparse.Namespace, env: dict, log: Path) -> dict:
    """A fresh jaxrs process's `LLM.warmup()`, compilation cache off: seconds, shapes, compiled now."""
    off = row.environ(dict(env, JAXRS_COMPILATION_CACHE="off"))
    worker = Worker(row.command(args.model) + ["--warmup"], off, log)
    try:
        reply = worker.read(args.timeout)
    finally:
        worker.close()
    return {
        "warmup_s": reply["warmup_s"],
        "warmup_shapes": reply.get("shapes"),
        "warmup_compiled": reply.get("compiled"),
    }


def prepare_work(args: argparse.Namespace) -> dict:
    """Token ids (and text, for mistral.rs) of the long prompt, the short prompts and the cold prompt,
    from jaxrs's reading of the model's tokenizer."""
    tok = load_tokenizer(args.model)
    longest = max([args.prompt_tokens, *args.prompt_lengths])
    long_ids = prompt_ids(tok, longest)
    if len(long_ids) < longest:
        raise SystemExit(f"the prompt text gives only {len(long_ids)} tokens")
    ids = long_ids[: args.prompt_tokens]
    n = max(args.concurrency)
    texts = [request_text(i) for i in range(n)]
    return {
        "ids": ids,
        "text": tok.decode(ids),
        "long_ids": long_ids,
        "long_texts": {n: tok.decode(long_ids[:n]) for n in args.prompt_lengths},
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
    keys = ["prefill_tok_s", "ttft_ms", "decode_tok_s", "decode_host_share", "decode_host_ms_per_call"]
    keys += [f"prefill_tok_s@{n}" for n in args.prompt_lengths]
    keys += [f"{k}@{c}" for c in args.concurrency for k in ("agg_tok_s", "host_share")]
    keys += ["cold_s", "cold_cached_s", "warmup_s", "warmup_shapes", "warmup_compiled", "load1"]
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
    ("decode_host_share", "decode host %", 2, False),
]
TAIL = [
    ("peak_mib", "peak MiB", 0, False),
    ("cold_s", "cold s", 1, False),
    ("cold_cached_s", "cold s, warm cache", 1, False),
    ("warmup_s", "warm-up s (shapes)", 1, False),
]
HOST_SHARE_TARGET = 0.01


def columns(args: argparse.Namespace) -> list[tuple[str, str, int, bool]]:
    agg = [(f"agg_tok_s@{c}", f"aggregate tok/s @{c}", 1, True) for c in args.concurrency]
    most = max(args.concurrency)
    lengths = [(f"prefill_tok_s@{n}", f"prefill tok/s @{n}", 1, True) for n in args.prompt_lengths]
    return (
        COLUMNS[:2]
        + lengths
        + COLUMNS[2:]
        + agg
        + [(f"host_share@{most}", f"host % @{most}", 2, False)]
        + TAIL
    )


def cell_text(row: Row, medians: dict, key: str, digits: int) -> str:
    value = medians.get(key)
    if value is None:
        return "—"
    if key.startswith(("host_share", "decode_host_share")):
        return f"{100 * value:.{digits}f}%"
    text = fmt(value, digits)
    if key.startswith("agg") and not row.ready.get("concurrent", True):
        text += " (seq)"
    if key == "warmup_s" and medians.get("warmup_shapes") is not None:
        text += f" ({medians['warmup_shapes']:.0f})"
    return text


def ratio(x: float | None, y: float | None, higher: bool) -> str:
    """x against y, > 1 when x is better."""
    if x is None or y is None or x <= 0 or y <= 0:
        return "—"
    return f"{(x / y if higher else y / x):.2f}x"


def ratio_table(pairs: list[tuple[Row, Row]], table: dict, cols: list) -> str:
    """A row of ratios per (a, b) pair; columns with no ratio at all left out."""
    cells = [
        [ratio(table[a.label].get(key), table[b.label].get(key), higher) for key, _, _, higher in cols]
        for a, b in pairs
    ]
    keep = [i for i in range(len(cols)) if any(c[i] != "—" for c in cells)]
    rows = [
        [f"{a.label} vs {b.label}", *(c[i] for i in keep)] for (a, b), c in zip(pairs, cells, strict=True)
    ]
    return markdown_table(["", *(cols[i][1] for i in keep)], rows)


def ab_pairs(rows: list[Row], args: argparse.Namespace) -> list[tuple[Row, Row]]:
    """(checkout row, the base checkout's row of the same mode) for every checkout after the first."""
    measured = [r for r in rows if r.checkout]
    labels = [name for name, _ in args.jaxrs_checkout if any(r.checkout["label"] == name for r in measured)]
    if len(labels) < 2:
        return []
    base = {r.mode: r for r in measured if r.checkout["label"] == labels[0]}
    return [(r, base[r.mode]) for r in measured if r.checkout["label"] != labels[0] and r.mode in base]


def print_tables(rows: list[Row], table: dict, args: argparse.Namespace) -> str:
    """The table (columns no row has a figure for left out), then the ratios: jaxrs against each peer,
    and each later checkout against the base one."""
    cols = [c for c in columns(args) if any(cell_text(r, table[r.label], c[0], c[2]) != "—" for r in rows)]
    lines = [[row.label, *(cell_text(row, table[row.label], k, d) for k, _, d, _ in cols)] for row in rows]
    text = markdown_table(["engine", *(c[1] for c in cols)], lines)
    ours = [r for r in rows if r.is_jaxrs]
    peers = [r for r in rows if not r.is_jaxrs]
    if ours and peers:
        text += "\n\nRatios (> 1: jaxrs better, i.e. faster or smaller):\n"
        text += ratio_table([(a, b) for a in ours for b in peers], table, cols)
    if pairs := ab_pairs(rows, args):
        text += (
            f"\n\nA/B ratios against {pairs[0][1].label} (> 1: the other checkout better: new/base for "
            "rates, base/new for times, shares and memory):\n"
        )
        text += ratio_table(pairs, table, cols)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or model folder (default: the demo GGUF)")
    ap.add_argument(
        "--engines",
        nargs="+",
        help="jaxrs (this tree's), jaxrs@LABEL (a --jaxrs-checkout), llamacpp, mistralrs, transformers "
        "(default: all, the checkouts instead of jaxrs when given)",
    )
    ap.add_argument(
        "--jaxrs-modes",
        nargs="+",
        default=["f32", "packed"],
        help="default f32 bf16 packed packed-bf16 f32-kv16 packed-kv16, each also with -ynndot (an XLA "
        "option A/B) or -unrolled (layers unrolled)",
    )
    ap.add_argument(
        "--jaxrs-checkout",
        action="append",
        default=[],
        type=parse_checkout,
        metavar="LABEL=PATH",
        help="engine jaxrs@LABEL: jaxrs imported from the checkout at PATH (repeatable; the first is the "
        "base of the A/B ratios)",
    )
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument(
        "--prefill-repeats",
        type=int,
        default=1,
        help="time to first token of the --prompt-tokens prompt this many times a pass; the median counts",
    )
    ap.add_argument(
        "--prompt-lengths",
        type=int,
        nargs="*",
        default=[],
        help="also the prefill rate of prompts of these many tokens (e.g. 2048 6000)",
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests a sequential engine runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true", help="no cold-start measurements")
    ap.add_argument("--skip-warmup", action="store_true", help="no warm-up compile time measurements")
    ap.add_argument("--timeout", type=float, default=900, help="seconds any one answer may take")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args()
    check_engines(ap, args)
    began = time.perf_counter()

    from jaxrs.loading import resolve_source

    args.model = str(resolve_source(args.model)[1])
    work = prepare_work(args)
    short = max(len(p) for p in work["prompts"])
    args.ctx = max(args.prompt_tokens, *args.prompt_lengths, short) + args.new_tokens + BLOCK
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


def check_engines(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--engines's default, and every jaxrs@LABEL in it a --jaxrs-checkout's."""
    labels = [label for label, _ in args.jaxrs_checkout]
    if len(set(labels)) < len(labels):
        ap.error("every --jaxrs-checkout needs its own LABEL")
    if args.engines is None:
        args.engines = [f"jaxrs@{label}" for label in labels] or ["jaxrs"]
        args.engines += ["llamacpp", "mistralrs", "transformers"]
    for engine in args.engines:
        if engine.startswith("jaxrs@") and engine.removeprefix("jaxrs@") not in labels:
            ap.error(f"--engines {engine}: no --jaxrs-checkout {engine.removeprefix('jaxrs@')}=PATH")
    if len(set(args.engines)) < len(args.engines):
        ap.error("--engines names an engine twice")
    for label in labels:
        if f"jaxrs@{label}" not in args.engines:
            print(f"--jaxrs-checkout {label}: not measured (jaxrs@{label} is not in --engines)")


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
    row.worker = Worker(row.command(args.model), row.environ(dict(env, JAXRS_COMPILATION_CACHE="off")), log)
    try:
        row.ready = row.worker.read(args.timeout)
    except WorkerDied as e:  # reported as a finding; the other engines still run
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        row.notes.append(f"could not load the model: {last}")
        print(f"{row.label}: could not load the model: {last}")
        row.worker = None
        return
    found = (row.ready.get("versions") or {}).get("jaxrs_path")
    if row.checkout and found and Path(found).resolve() != Path(row.checkout["path"]):
        row.notes.append(f"its worker imported jaxrs from {found}, not from the checkout: not measured")
        print(f"{row.label}: {row.notes[-1]}")
        row.worker.close()
        row.worker = None
        return
    print(f"{row.label}: loaded in {time.perf_counter() - start:.1f} s")


def run_pass(p: int, rows: list[Row], args: argparse.Namespace, work: dict, env: dict, logs: Path) -> None:
    """Pass `p` (0: warm-up) over every live engine in turn (odd passes in row order, even ones reversed),
    then each one's peak memory so far; in counted passes also the fresh processes: cold starts, and
    jaxrs's warm-up."""
    for row in rows if p % 2 or not p else rows[::-1]:
        if row.worker is None:
            continue
        start = time.perf_counter()
        try:
            result = measure(row, args, work, warmup=p == 0)
            row.ready["max_rss_mib"] = row.worker.ask(60, op="stats")["max_rss_mib"]
        except (WorkerDied, RuntimeError) as e:
            row.notes.append(f"pass {p}: {e}")
            print(f"{row.label}, pass {p}: failed: {e}")
            if isinstance(e, WorkerDied):
                row.worker = None
            continue
        if p:
            result |= measure_fresh(p, row, args, work, env, logs)
        result["load1"] = os.getloadavg()[0]  # the machine's 1-minute load, this engine's own included
        if p:
            row.passes.append(result)
        shown = ", ".join(
            f"{k} {100 * v:.2f}%" if "host_share" in k else f"{k} {v:.1f}"
            for k, v in result.items()
            if isinstance(v, float)
        )
        tag = f"pass {p}" + (" (warm-up)" if not p else "")
        print(f"{tag} {row.label}: {time.perf_counter() - start:.0f} s  {shown}", flush=True)


def measure_fresh(p: int, row: Row, args: argparse.Namespace, work: dict, env: dict, logs: Path) -> dict:
    """Pass `p`'s fresh processes of one row: cold starts, and jaxrs's warm-up. A failure is noted, and
    the live worker carries on."""
    runs = []
    if not args.skip_cold:
        runs.append(("cold start", lambda: measure_cold(row, args, work, env, log_path(logs, row, ".cold"))))
    if row.is_jaxrs and not args.skip_warmup:
        runs.append(("warm-up", lambda: measure_warmup(row, args, env, log_path(logs, row, ".warmup"))))
    result: dict = {}
    for what, run in runs:
        try:
            result |= run()
        except (WorkerDied, RuntimeError, KeyError) as e:
            row.notes.append(f"pass {p}, {what}: {e}")
            print(f"{row.label}, pass {p}: {what} failed: {e}")
    return result


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
        print_host_shares(rows, table, args)
        print_ab_passes(rows, args)
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
            "protocol": r.ready.get("protocol", 1 if r.ready else None),
            "checkout": r.checkout,
            "notes": r.notes,
        }
        for r in rows
    }
    payload = {"model": args.model, "args": vars(args), "machine": machine_facts(), "rows": row_info}
    write_json(args.out, payload | {"skipped": skipped, "passes_done": done, "table": text, "wall_s": wall})


def print_host_shares(rows: list[Row], table: dict, args: argparse.Namespace) -> None:
    """Each jaxrs row's host shares against the target (under 1% of the wall time)."""
    keys = [("decode_host_share", "decode")] + [(f"host_share@{c}", f"@{c}") for c in args.concurrency]
    parts, over = [], []
    for row in rows:
        shares = [(name, table[row.label].get(key)) for key, name in keys]
        shares = [(name, v) for name, v in shares if v is not None]
        if shares:
            parts.append(f"{row.label} " + ", ".join(f"{100 * v:.2f}% {name}" for name, v in shares))
            over += [f"{row.label} {name}" for name, v in shares if v >= HOST_SHARE_TARGET]
        ms = table[row.label].get("decode_host_ms_per_call")
        if ms is not None:
            parts[-1] += f" ({ms:.2f} ms a decode call)"
    if parts:
        verdict = f"over {100 * HOST_SHARE_TARGET:.0f}%: {', '.join(over)}" if over else "all under 1%"
        print(f"host share of wall time: {'; '.join(parts)}; {verdict}")


def print_ab_passes(rows: list[Row], args: argparse.Namespace) -> None:
    """Pass by pass figures of the checkout rows (the medians hide how far apart the passes were)."""
    keys = [("decode_tok_s", "decode tok/s"), (f"agg_tok_s@{max(args.concurrency)}", "aggregate tok/s")]
    keys += [("prefill_tok_s", "prefill tok/s")]
    keys += [(f"prefill_tok_s@{n}", f"prefill tok/s @{n}") for n in args.prompt_lengths]
    keys += [("cold_s", "cold s"), ("warmup_s", "warm-up s")]
    for key, name in keys:
        parts = [
            f"{r.label} " + " / ".join(fmt(p.get(key)) for p in r.passes)
            for r in rows
            if r.checkout and any(p.get(key) is not None for p in r.passes)
        ]
        if parts:
            print(f"per pass, {name}: {'; '.join(parts)}")


if __name__ == "__main__":
    main()
