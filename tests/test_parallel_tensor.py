"""Tensor parallelism end to end on a simulated 8-device CPU mesh: the same greedy tokens as one
device, and log-probabilities within f32 tolerance of one device's and of transformers'.

The device count must be set before JAX starts, so the models run in a child process
(`tests/tensor_parallel.py`) and nothing leaks into the other test files of this worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.simulated_devices import run_json


def run_sweep(tmp_path: Path, runs: list[str]) -> dict:
    return run_json("tests.tensor_parallel", [str(tmp_path), *runs], devices=8)


def check(results: dict) -> None:
    """Every run against TP 1 of its weights, dense runs against transformers, and a run re-quantized
    while sharded against Q8_0 weights loaded from the start."""
    for key, got in results.items():
        name, tp = key.rsplit("/", 1)
        if tp == "transformers":
            continue
        config, _, variant = name.partition("-")
        if config == "qwen2":  # the config's own name has dashes
            config, variant = name, ""
        packed = variant.startswith("q")
        one = results.get(f"{name}/1") or results[f"{config}/1"]
        assert got["tokens"] == one["tokens"], key
        np.testing.assert_allclose(got["logprobs"], one["logprobs"], atol=2e-4, err_msg=key)
        if not packed:
            ref = results[f"{config}/transformers"]
            np.testing.assert_allclose(got["logprobs"], ref, atol=2e-3, err_msg=key)
        if tp != "1":
            assert "'tp'" in got["kv_spec"], key  # the cache is split by heads
        if "requantized_tokens" in got:
            assert got["requantized_tokens"] == results[f"{config}-q8_0/1"]["tokens"], key


def test_tp_matches_one_device(tmp_path):
    """GQA with fewer KV heads than devices (TP 8 over 2 KV heads), packed Q8_0 weights, re-ISQ of
    sharded weights, Mixtral's experts."""
    runs = ["llama/1", "llama/8", "llama-q8_0/1", "llama-q8_0/4", "llama-reisq/2", "mixtral/1", "mixtral/2"]
    check(run_sweep(tmp_path, runs))


@pytest.mark.skipif(not os.environ.get("JAXRS_TP_SWEEP"), reason="set JAXRS_TP_SWEEP=1 (about 4 minutes)")
def test_tp_sweep(tmp_path):
    """Every family at every size of `tests.tensor_parallel.RUNS` (TP 1, 2, 4, 8; tied embeddings with
    q/k/v biases; the Pallas attention kernel per shard, in interpret mode)."""
    check(run_sweep(tmp_path, []))
