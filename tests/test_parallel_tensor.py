"""Tensor parallelism end to end on a simulated 8-device CPU mesh: the same greedy tokens as one
device, and log-probabilities within f32 tolerance of one device's and of transformers'.

The device count must be set before JAX starts, so the models run in a child process
(`tests/tensor_parallel.py`) and nothing leaks into the other test files of this worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = "--xla_force_host_platform_device_count=8"


def simulated_env() -> dict[str, str]:
    """This process's environment with 8 simulated CPU devices and the tree's packages first."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"XLA_FLAGS": SIMULATED, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def run_sweep(tmp_path: Path, runs: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.tensor_parallel", str(tmp_path), *runs],
        cwd=ROOT,
        env=simulated_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(results: dict) -> None:
    """Every TP > 1 run against its TP 1 run, and every run's log-probabilities against transformers."""
    for key, got in results.items():
        name, tp = key.rsplit("/", 1)
        if tp == "transformers":
            continue
        config = name.split("-q")[0]
        one = results[f"{name}/1"]
        assert got["tokens"] == one["tokens"], key
        np.testing.assert_allclose(got["logprobs"], one["logprobs"], atol=2e-4, err_msg=key)
        if name == config:  # dense weights: transformers' numbers
            ref = results[f"{config}/transformers"]
            np.testing.assert_allclose(got["logprobs"], ref, atol=2e-3, err_msg=key)
        if tp != "1":
            assert "'tp'" in got["kv_spec"], key  # the cache is split by heads


def test_tp_matches_one_device(tmp_path):
    """GQA with fewer KV heads than devices (TP 8 over 2 KV heads), packed Q8_0 weights, tied embeddings
    with q/k/v biases, Mixtral's experts."""
    runs = ["llama/1", "llama/8", "llama-q8_0/1", "llama-q8_0/4", "mixtral/1", "mixtral/2"]
    check(run_sweep(tmp_path, runs))


@pytest.mark.skipif(not os.environ.get("JAXRS_TP_SWEEP"), reason="set JAXRS_TP_SWEEP=1 (about 4 minutes)")
def test_tp_sweep(tmp_path):
    """Every family at every size of `tests.tensor_parallel.RUNS` (TP 1, 2, 4, 8)."""
    check(run_sweep(tmp_path, []))
