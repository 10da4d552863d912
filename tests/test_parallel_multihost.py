"""Serving from several processes: the step-broadcast protocol over an in-memory store, then two real
processes of 4 simulated CPU devices each (`jax.distributed` with gloo collectives, `tests/multihost.py`)
giving one process's tokens, and process 0 failing with a clear message once process 1 has left."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from jaxrs.parallel import multihost
from tests.simulated_devices import ROOT, run_json, simulated_env
from tests.tensor_parallel import CONFIGS


class DictStore:
    """An in-memory `Transport` shared by threads."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def put(self, key: str, value: str) -> None:
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def get(self, key: str, timeout_s: float) -> str:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_s):
                raise TimeoutError(key)
            return self.values[key]

    def delete(self, key: str) -> None:
        with self.changed:
            self.values.pop(key, None)


def test_followers_run_every_step_in_order_and_stop():
    store, ran = DictStore(), {1: [], 2: []}
    followers = [threading.Thread(target=multihost.follow, args=(ran[p].append, store, p, 0.05)) for p in ran]
    for t in followers:
        t.start()
    leader = multihost.Leader(store, [1, 2], timeout_s=5)
    for call in ("a", "b", "c"):
        leader.publish(call)
    leader.stop()
    for t in followers:
        t.join(5)
    assert ran == {1: ["a", "b", "c"], 2: ["a", "b", "c"]}
    assert list(store.values) == ["jaxrs/step/3"]  # taken steps are cleared as they go


def test_a_lost_follower_is_named():
    leader = multihost.Leader(DictStore(), [1], timeout_s=0.1)
    with pytest.raises(multihost.FollowerLost, match="process 1 did not take step 0 within 0.1 s"):
        leader.publish("a")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_one_process_tokens(tmp_path):
    from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

    folder = tmp_path / "llama"  # 8 query heads over 8 devices, 4 per process
    save_tiny_hf_model(CONFIGS["llama"], folder, seed=2)
    save_tiny_tokenizer(folder, CONFIGS["llama"].vocab_size)
    single = run_json("tests.multihost", [str(folder), "0", "0", "single"], devices=1)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost", str(folder), port, str(p), "lose"],
            cwd=ROOT,
            env=simulated_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in (1, 0)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[1].returncode == 0, outs[1][1][-4000:]
    out = json.loads(outs[1][0].strip().splitlines()[-1])
    assert out["tokens"] == single["tokens"]
    assert out["error"].startswith("process 1 did not take step")
    assert "restart every process" in out["error"]
