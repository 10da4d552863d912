"""The benchmark scripts still run (tiny settings; figures are not checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parent.parent / "bench"


def bench(script: str, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def test_single_stream_script(tmp_path):
    out = bench(
        "bench_single_stream.py",
        "--prompt-tokens",
        "24",
        "--new-tokens",
        "4",
        "--passes",
        "1",
        "--no-peer",
        "--out",
        str(tmp_path / "s.json"),
    )
    assert out["results"]["jaxrs"]["decode_tok_s"] > 0


def test_throughput_script(tmp_path):
    out = bench(
        "bench_throughput.py",
        "--concurrency",
        "1",
        "2",
        "--new-tokens",
        "4",
        "--passes",
        "1",
        "--out",
        str(tmp_path / "t.json"),
    )
    assert [r["concurrency"] for r in out["rows"]] == [1, 2]
