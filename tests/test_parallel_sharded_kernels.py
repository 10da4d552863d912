"""The packed matmul per shard on a simulated 8-device CPU mesh (in a child process,
`tests/sharded_qmatmul.py`): the Pallas kernel (interpret mode) on each device's slice of column- and
row-parallel Q4_K and Q8_0 weights equals the unsharded XLA reference; and the `SplitTensor` marking
that tells the op which slice, checked in process."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrs.parallel.split_tensor import INPUTS, OUTPUTS, SplitTensor, split_of
from jaxrs.quant import quantize
from tests.simulated_devices import run_json


@pytest.fixture(scope="module")
def results():
    return run_json("tests.sharded_qmatmul", [], devices=8)


@pytest.mark.parametrize("case", ["q4_k-column", "q4_k-row", "q8_0-column", "q8_0-row", "q8_0-head"])
def test_pallas_per_shard_equals_the_unsharded_reference(results, case):
    got = results[case]
    assert got["error"] <= 1e-6 * max(1.0, got["scale"]), got
    assert "shard_map" in got["holds"] and "pallas_call" in got["holds"], got
    assert ("psum" in got["holds"]) == case.endswith("-row"), got  # only row-parallel partial sums add up


def test_any_implementation_runs_per_shard_and_unmarked_weights_take_xla(results):
    assert results["q8_0-whole"]["holds"] == ["shard_map", "pallas_call"]  # replicated: whole everywhere
    xla = results["q4_k-row-xla"]
    assert xla["holds"] == ["shard_map", "psum"] and xla["error"] <= 1e-5, xla
    unmarked = results["q4_k-row-unmarked"]  # placed without the marking: the partitioned XLA path
    assert unmarked["holds"] == [] and unmarked["error"] <= 1e-5, unmarked


def test_split_tensor_keeps_its_axis_through_transformations():
    qt = SplitTensor(quantize(np.ones((3, 16, 64), np.float32), "Q8_0"), INPUTS)  # stacked layers
    layer = jax.tree.map(lambda a: a, qt)[1]
    assert isinstance(layer, SplitTensor) and layer.axis == INPUTS and layer.out_in == (16, 64)
    seen = []
    jax.lax.scan(lambda c, w: (seen.append((type(w), w.axis, w.arrays["qs"].shape)), (c, None))[1], 0, qt)
    assert seen == [(SplitTensor, INPUTS, (16, 64))]  # the scan body sees one layer, still marked
    local = layer.local({k: a[:, :16] for k, a in layer.arrays.items()}, 4)
    assert type(local).__name__ == "QuantizedTensor" and local.out_in == (16, 16)
    assert SplitTensor(layer, OUTPUTS).local(layer.arrays, 4).out_in == (4, 64)
    assert layer.partition(3) == P(None, None, "tp") and SplitTensor(layer, None).partition(2) == P()
    with pytest.raises(ValueError, match="outputs .-2. or inputs .-1., not 0"):
        SplitTensor(layer, 0)


def test_split_of_reads_the_mesh_axis():
    assert split_of(P(None, "tp", None), 3) == OUTPUTS
    assert split_of(P(None, "tp"), 2) == INPUTS
    assert split_of(P("tp"), 2) == OUTPUTS  # a spec shorter than the array
    assert split_of(P(), 2) is None
