"""Tensor parallelism end to end on a simulated 8-device CPU mesh, every model family of the registry:
TP 2, 4 and 8 give the greedy tokens of one device, with log-probabilities within f32 tolerance of one
device's and of transformers'.

The device count must be set before JAX starts, so the models run in one child process
(`tests/tensor_parallel.py`) and nothing leaks into the other test files of this worker; each test
here checks its part of that one sweep.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxrs.models.registry import FAMILIES
from tests.simulated_devices import run_json
from tests.tensor_parallel import RUNS, SIZES

ONE_DEVICE = 2e-4  # |log-probability difference| from the same weights on one device
TRANSFORMERS = 2e-3  # from transformers' f32 forward of the same tokens


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    return run_json("tests.tensor_parallel", [str(tmp_path_factory.mktemp("tp"))], devices=8)


def test_every_family_is_swept(sweep):
    assert sweep["families"] == sorted(FAMILIES)
    done = sweep["runs"]
    for name in [*FAMILIES, "gguf"]:
        assert [tp for tp in SIZES if f"{name}/{tp}" in done] == list(SIZES), name
    assert len(done) == len(RUNS)


@pytest.mark.parametrize("key", [r.key for r in RUNS if r.tp > 1])
def test_split_runs_give_one_devices_tokens(sweep, key):
    """GQA with fewer KV heads than devices (8 query heads over 2 KV heads: TP 4 and 8 repeat them), a
    packed GGUF (Q4_1 and Q8_0), Mixtral's experts, the Pallas kernels per shard (interpret mode)."""
    got = sweep["runs"][key]
    one = sweep["runs"][got["baseline"]]
    assert got["tokens"] == one["tokens"]
    np.testing.assert_allclose(got["logprobs"], one["logprobs"], atol=ONE_DEVICE)
    assert "'tp'" in got["kv_spec"]  # the cache is split by heads


def test_packed_weights_are_placed_with_their_split(sweep):
    """What tells the `qmatmul` op which slice each device holds (`SplitTensor.axis`). On CPU the
    GGUF's Q4_1 and Q8_0 load transcoded (U8M, Q8F): the Pallas kernel per shard reads those."""
    q, o, head = sweep["runs"]["gguf/2+qmatmul=pallas"]["placed"]
    assert q.startswith("SplitTensor(") and q.endswith("axis=-2)")  # column-parallel: outputs
    assert o.startswith("SplitTensor(") and o.endswith("axis=-1)")  # row-parallel: inputs
    assert head.startswith("SplitTensor(") and head.endswith("axis=-2)")  # vocabulary
    assert sweep["runs"]["gguf/1"]["placed"][1].startswith("QuantizedTensor(")  # one device: as loaded


@pytest.mark.parametrize("key", [r.key for r in RUNS if r.model != "gguf"])
def test_log_probabilities_match_transformers(sweep, key):
    """Every family at every size (the GGUF's packed weights have no transformers twin): the greedy
    tokens are transformers' own choices, their log-probabilities within f32 tolerance."""
    got = sweep["runs"][key]
    ref = sweep["transformers"][key.split("/")[0]]
    assert got["tokens"] == ref["argmax"]
    np.testing.assert_allclose(got["logprobs"], ref["logprobs"], atol=TRANSFORMERS)
    if "score" in got:  # the scoring step on 8 devices
        np.testing.assert_allclose(got["score"], ref["score"], atol=TRANSFORMERS)


def test_reisq_of_split_weights(sweep):
    """Weights re-quantized to Q8_0 while split over 2 devices give the tokens one device gets."""
    runs = sweep["runs"]
    assert runs["llama/2"]["requantized_tokens"] == runs["llama/1"]["requantized_tokens"]
    held = "Q8F"  # the simulated devices are XLA:CPU's: Q8_0 in the CPU layout (`loading.device_layout`)
    assert runs["llama/1"]["requantized_weight"].startswith(f"QuantizedTensor({held}, shape=(2, 128, 64)")
    assert runs["llama/2"]["requantized_weight"].startswith(f"SplitTensor({held}, shape=(2, 128, 64)")
