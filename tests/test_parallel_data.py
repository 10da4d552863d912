"""Data parallelism through the server: two replicas on a simulated 2-device CPU mesh (in a child
process, `tests/data_parallel.py`) answer 32 concurrent requests, split between them, with the tokens
one replica gives alone."""

from __future__ import annotations

from tests.simulated_devices import run_json


def test_two_replicas_serve_32_requests(tmp_path):
    out = run_json("tests.data_parallel", [str(tmp_path / "model")], devices=2)
    assert out["devices"] == ["cpu:0", "cpu:1"]  # each replica on its own device
    assert out["served"] == out["alone"]
    assert sum(out["routed"]) == 32
    assert min(out["routed"]) >= 8, out["routed"]  # both replicas took a real share
