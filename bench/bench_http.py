"""Serving benchmark over HTTP: `jaxrs serve` on 127.0.0.1 driven by the official openai AsyncOpenAI client.

    python bench/bench_http.py [--model PATH] [--users 1 8 32] [--requests-per-user 4] [--max-tokens 64]

Starts the server in a child process (a free loopback port, the demo model unless --model), waits for
/health, then for each user count N runs N concurrent users, each sending --requests-per-user streaming
chat requests one after another (greedy, EOS ignored, so each generates exactly --max-tokens tokens;
every user and request has its own prompt). Before each measured round every user sends one short
throwaway request, so compiles and first-use costs stay out of the figures. Reports, per user count:

- output tok/s: completion tokens (the usage chunk's count) of the round / the round's wall time;
- TTFT: request start to its first content chunk, p50 and p99;
- ITL: time between successive content chunks, p50 and p99 (as vLLM's benchmark_serving measures it;
  a chunk carries several tokens when the engine decodes several steps per call);
- TPOT: (request time - TTFT) / (tokens - 1), mean over requests (per token).

Prints a Markdown table, writes JSON (--out, default bench/results/http.json), stops the server. Every
wait is bounded (--start-timeout for startup, --round-timeout per user count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the sea", "a mountain", "the city at night", "an old library", "a robot", "the first snow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args: argparse.Namespace, log_path: Path):
    """`jaxrs serve` in a child process; yields its base URL and startup seconds once /health is 200."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "jaxrs.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--max-model-len", str(args.max_model_len)]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(max(args.users) * 2)]
    if args.model:
        cmd += ["--model", args.model]
    if args.no_warmup:
        cmd.append("--no-warmup")
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not start within {args.start_timeout} s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, time.perf_counter() - began
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: its timings and token count (or its error)."""
    start = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunk_times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, not fatal: the table says how many failed
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not chunk_times:
        return {"error": "no content streamed"}
    ttft = chunk_times[0] - start
    return {
        "ttft": ttft,
        "itl": list(np.diff(chunk_times)),
        "tpot": (end - start - ttft) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "chunks": len(chunk_times),
    }


async def run_round(url: str, model: str, users: int, args: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.round_timeout
    )

    def prompt(user: int, request: int) -> str:
        topic = TOPICS[(user + request) % len(TOPICS)]
        return f"Write a long story about {topic}. (user {user}, request {request})"

    async def user_loop(user: int) -> list[dict]:
        return [
            await one_request(client, model, prompt(user, r), args.max_tokens)
            for r in range(args.requests_per_user)
        ]

    try:
        # Throwaway: every user once, short, so the shapes this concurrency needs are compiled.
        await asyncio.wait_for(
            asyncio.gather(
                *(one_request(client, model, prompt(u, -1), min(8, args.max_tokens)) for u in range(users))
            ),
            args.round_timeout,
        )
        start = time.perf_counter()
        per_user = await asyncio.wait_for(
            asyncio.gather(*(user_loop(u) for u in range(users))), args.round_timeout
        )
        wall = time.perf_counter() - start
    finally:
        await client.close()
    results = [r for rs in per_user for r in rs]
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in good)
    ttft = [r["ttft"] for r in good]
    itl = [x for r in good for x in r["itl"]]
    tpot = [r["tpot"] for r in good if r["tpot"] is not None]

    def ms(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    return {
        "users": users,
        "requests": len(results),
        "errors": len(errors),
        "first_errors": errors[:3],
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
        "tpot_mean_ms": round(float(np.mean(tpot)) * 1000, 1) if tpot else None,
        "tokens_per_chunk": round(tokens / sum(r["chunks"] for r in good), 2) if good else None,
    }


def table(rows: list[dict]) -> str:
    cols = [
        ("users", "users"),
        ("requests", "requests"),
        ("output tok/s", "output_tok_s"),
        ("TTFT p50 ms", "ttft_p50_ms"),
        ("TTFT p99 ms", "ttft_p99_ms"),
        ("ITL p50 ms", "itl_p50_ms"),
        ("ITL p99 ms", "itl_p99_ms"),
        ("TPOT mean ms", "tpot_mean_ms"),
        ("tokens/chunk", "tokens_per_chunk"),
        ("errors", "errors"),
    ]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[k]) for _, k in cols) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model source (default: the demo model)")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 8, 32], help="concurrent users per round")
    ap.add_argument("--requests-per-user", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--no-warmup", action="store_true", help="start the server without compiling every shape")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for /health")
    ap.add_argument("--round-timeout", type=float, default=600, help="seconds per user count")
    ap.add_argument("--out", type=Path, default=RESULTS / "http.json", help="JSON results file")
    args = ap.parse_args()

    import httpx

    with tempfile.TemporaryDirectory() as tmp, server(args, Path(tmp) / "server.log") as (url, startup_s):
        print(f"server up in {startup_s:.1f} s", file=sys.stderr)
        started = time.perf_counter()
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        rows = []
        for users in args.users:
            row = asyncio.run(run_round(url, model, users, args))
            print(f"{users} users: {row['output_tok_s']} tok/s, {row['errors']} errors", file=sys.stderr)
            rows.append(row)
        bench_s = time.perf_counter() - started

    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    report = {
        "model": model,
        "config": config,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        },
        "startup_s": round(startup_s, 1),
        "bench_s": round(bench_s, 1),
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
