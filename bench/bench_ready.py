"""How soon `jaxrs serve` answers: process start to /health 200, to the first chat answer, and to the
end of the background warm-up (the "warm-up complete" log line, or "warm-up stopped" where the compiled
steps reached the memory maps' share); or (--run) how soon `jaxrs run`
prints its first token.

    python bench/bench_ready.py [--cache off|DIR] [--max-wait 900] [--label NAME] [-- SERVE ARGS...]
    python bench/bench_ready.py --run [--cache off|DIR] [-- RUN ARGS...]

Starts `jaxrs serve` (its default limits, the demo model unless the serve arguments say otherwise) on a
free loopback port with `JAXRS_COMPILATION_CACHE` set to --cache, polls /health every 0.2 s, sends one
short greedy chat request once it is 200 (the time to its answer is "first answer"), then waits for the
"warm-up complete" line or --max-wait, reading the server's /metrics for the shapes still pending.
Prints one JSON line with the seconds (null: not reached) and the load average at the start. With
--run: `jaxrs run -p "Hi!" --max-tokens 8 --temperature 0`, process start to the first byte of the
answer on stdout ("first_token") and to its exit, and the CPU seconds it used in all ("cpu_s").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_http import free_port  # noqa: E402


def watch(stream, began: float, marks: dict, lines: list) -> None:
    """Note when each startup log line first appears."""
    patterns = {
        "loaded": r" loaded .* in [0-9.]+ s",
        "ready_log": r"step shapes ready in",
        "complete": r"warm-up complete|warm-up: \d+ shapes|warm-up stopped",
    }
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        for name, pattern in patterns.items():
            if name not in marks and re.search(pattern, line):
                marks[name] = time.perf_counter() - began


def first_token(args: argparse.Namespace, extra: list[str]) -> dict:
    """`jaxrs run`'s process start to its first printed byte, and to its exit."""
    cmd = [sys.executable, "-m", "jaxrs.cli", "run", "-p", "Hi!", "--max-tokens", "8", "--temperature", "0"]
    env = dict(os.environ, JAXRS_COMPILATION_CACHE=args.cache, TQDM_DISABLE="1")
    began = time.perf_counter()
    proc = subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - began
    _, _, usage = os.wait4(proc.pid, 0)  # CPU seconds: less swayed than wall time by other work
    return {
        "first_token": round(first, 1),
        "exit": round(time.perf_counter() - began, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="off", help="JAXRS_COMPILATION_CACHE for the server")
    ap.add_argument("--max-wait", type=float, default=900.0, help="seconds before giving up")
    ap.add_argument("--label", default="")
    ap.add_argument("--log", help="write the server's output here")
    ap.add_argument("--run", action="store_true", help="time `jaxrs run` to its first token instead")
    args, serve = ap.parse_known_args()
    serve = [a for a in serve if a != "--"]
    if args.run:
        load = os.getloadavg()[0]
        print(json.dumps({"label": args.label, **first_token(args, serve), "load1": load}))
        return
    port = free_port()
    cmd = [sys.executable, "-m", "jaxrs.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve]
    env = dict(os.environ, JAXRS_COMPILATION_CACHE=args.cache, TQDM_DISABLE="1")
    load = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks: dict[str, float] = {}
    lines: list[str] = []
    reader = threading.Thread(target=watch, args=(proc.stdout, began, marks, lines), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    pending = None
    try:
        while time.perf_counter() - began < args.max_wait and proc.poll() is None:
            if "health" not in marks:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        marks["health"] = time.perf_counter() - began
                        body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8}
                        httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=600)
                        marks["first_answer"] = time.perf_counter() - began
                except httpx.HTTPError:
                    pass
            elif "complete" in marks:
                break
            time.sleep(0.2)
        if "health" in marks:
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            found = re.search(r"^step_shapes_pending (\S+)", metrics, re.M)
            pending = float(found.group(1)) if found else None
    finally:
        proc.terminate()
        proc.wait(30)
        if args.log:
            Path(args.log).write_text("\n".join(lines) + "\n")
    keys = ("loaded", "ready_log", "health", "first_answer", "complete")
    result = {k: round(marks[k], 1) if k in marks else None for k in keys}
    waited = round(time.perf_counter() - began, 1)
    extra = {"pending_at_end": pending, "waited": waited, "load1": load}
    print(json.dumps({"label": args.label, **result, **extra}))


if __name__ == "__main__":
    main()
