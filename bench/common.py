"""What the benchmark scripts share: the results folder, prompts, medians, Markdown tables, machine facts.

Standard library only: `peer_worker.py` imports it under the peer engines' own interpreters.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TOPICS = [
    "the sea",
    "a mountain",
    "the city at night",
    "an old library",
    "a robot",
    "the first snow",
    "a long journey",
    "a small garden",
]


def prompt_text() -> str:
    """Varied text (prose and code) long enough for a prompt of thousands of tokens with any tokenizer,
    the same from run to run: the source of the standard library's `argparse`."""
    import argparse

    return Path(argparse.__file__).read_text()


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """The first `n` tokens of `prompt_text()` (no special tokens), so every engine gets the same ids."""
    return list(tokenizer.encode(prompt_text(), add_special_tokens=False))[:n]


def request_text(i: int) -> str:
    """Request `i`'s short prompt in a concurrency run (each request its own, so none share a prefix)."""
    return f"Request {i}: write a few lines about {TOPICS[i % len(TOPICS)]}."


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are present (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_ms(fn: Any, *args: Any, repeats: int) -> float:
    """Median ms per call of a jitted function, after one call that compiles (jax is imported here, so
    the peer workers' interpreters, which lack it, can still import this module)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """The CPU, cores, memory, OS and Python of this machine (what a figure must be read against)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of these distributions in this interpreter (None when absent)."""
    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(payload, indent=2, default=_plain))
    print(f"wrote {path}")


def write_results(args: Any, results: list[dict[str, Any]]) -> None:
    """A script's `results` with its arguments and the machine's facts, as JSON at `args.out`."""
    write_json(
        args.out,
        {"args": vars(args) | {"out": str(args.out)}, "machine": machine_facts(), "results": results},
    )


def _plain(value: object) -> object:
    """NumPy scalars, paths and the like as JSON values."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)
