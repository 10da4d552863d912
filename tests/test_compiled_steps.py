"""Step executables compile once per signature, whichever threads ask: checked with a stand-in for the
jitted steps whose compiles can be held open, so the races are forced rather than hoped for."""

from __future__ import annotations

import threading
import time
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.engine import compiled_steps
from jaxrs.engine.compiled_steps import CompiledSteps, StepCall, lean_compile


class FakeStep:
    """A jitted step's `lower(...).compile()`: counts compiles per argument shapes; a compile waits for
    `gate` (if `held(rows)`) and raises while `failures` lasts."""

    def __init__(self, gate: threading.Event | None = None, failures: int = 0, held=lambda rows: True):
        self.gate, self.failures, self.held = gate, failures, held
        self.compiles: list[tuple] = []
        self.cleared = 0  # `clear_cache` calls
        self.live = weakref.WeakSet()  # executables someone still holds
        self.started = threading.Semaphore(0)

    def clear_cache(self):
        self.cleared += 1

    def lower(self, params, kv, *args, **statics):
        assert params["w"].shape == (2, 3) and kv.shape == (4,)  # shapes only
        assert not hasattr(kv, "delete"), "lowered from the live arrays"
        shapes = tuple(np.shape(a) for a in args)
        return types.SimpleNamespace(compile=lambda: self._compile(shapes, statics))

    def _compile(self, shapes, statics):
        self.started.release()
        if self.gate is not None and self.held(shapes[0][0]):
            assert self.gate.wait(300)  # long: a test may hold it while the real engine compiles
        if self.failures:
            self.failures -= 1
            raise RuntimeError("XLA said no")
        self.compiles.append((shapes, dict(statics)))
        executable = lambda params, kv, *args: ("ran", shapes)  # noqa: E731
        self.live.add(executable)
        return executable


def compiled_with(step: FakeStep) -> CompiledSteps:
    steps = types.SimpleNamespace(decode=step, prefill=step, score=step)
    return CompiledSteps(steps, {"w": jnp.zeros((2, 3))}, jnp.zeros(4))


def call(rows: int, value: int = 0, flags: str = "greedy") -> StepCall:
    args = (np.full(rows, value, np.int32), {"temperature": np.zeros(rows, np.float32)})
    return StepCall("decode", args, {"flags": flags}, (rows,))


def test_one_compile_per_signature_however_many_threads_ask():
    gate = threading.Event()
    step = FakeStep(gate)
    compiled = compiled_with(step)
    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(compiled.get, call(4, value=i)) for i in range(8)]
        assert step.started.acquire(timeout=10)  # one compile under way, the others wait for it
        assert compiled.has(call(4)) and not any(w.done() for w in waiting)
        gate.set()
        executables = {id(w.result()) for w in waiting}
    assert len(executables) == 1 and len(step.compiles) == 1
    assert compiled.labels == [("decode", 4)] and len(compiled) == 1


def test_shapes_and_statics_make_the_signature_values_do_not():
    step = FakeStep()
    compiled = compiled_with(step)
    for c in (call(1), call(1, value=7), call(2), call(1, flags="sampled"), call(2, value=3)):
        assert compiled.get(c)(None, None)[0] == "ran"
    assert len(step.compiles) == 3
    assert compiled.missing([]) == 0


def test_a_failed_compile_reaches_every_waiter_and_is_tried_again():
    gate = threading.Event()
    step = FakeStep(gate, failures=1)
    compiled = compiled_with(step)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(compiled.get, call(1))
        assert step.started.acquire(timeout=10)
        second = pool.submit(compiled.get, call(1))
        time.sleep(0.5)  # the second caller is waiting on the first's compile
        gate.set()
        for waiter in (first, second):
            with pytest.raises(RuntimeError, match="XLA said no"):
                waiter.result()
    assert not compiled.has(call(1)) and len(compiled) == 0
    compiled.get(call(1))  # compiles again, and succeeds
    assert len(step.compiles) == 1 and compiled.has(call(1))


def test_a_compile_hands_the_heap_back_before_and_after_and_drops_the_steps_traces(monkeypatch):
    step = FakeStep()
    released = []  # compiles done at each release
    monkeypatch.setattr(compiled_steps, "release_freed", lambda: released.append(len(step.compiles)))
    compiled_with(step).get(call(2))
    assert released == [0, 1] and step.cleared == 1


def test_lean_compile_leaves_no_trace_of_the_shape_in_jaxs_caches():
    traces = []

    def add_one(x):
        traces.append(x.shape)
        return x + 1

    kept, lean = jax.jit(add_one), jax.jit(add_one)
    kept.lower(jnp.zeros(3)).compile()
    kept.lower(jnp.zeros(3))
    assert len(traces) == 1  # JAX traced the shape once and kept it
    with lean_compile(lean):
        executable = lean.lower(jnp.zeros(5)).compile()
    lean.lower(jnp.zeros(5))
    assert len(traces) == 3  # traced again: the first trace was dropped
    assert np.asarray(executable(jnp.zeros(5))).tolist() == [1.0] * 5  # the executable still runs


def limit_maps(monkeypatch, step: FakeStep, limit: int = 1000, each: int = 100) -> None:
    """The system allows `limit` memory maps; the process holds 100 and `each` per live executable."""
    monkeypatch.setattr(compiled_steps, "memory_map_limit", lambda: limit)
    monkeypatch.setattr(compiled_steps, "memory_maps", lambda: 100 + each * len(step.live))


def test_past_the_maps_share_the_least_recently_used_executables_are_dropped(monkeypatch, caplog):
    """Half the limit holds four executables here: a fifth drops the one used longest ago (not the one
    just used), which compiles again when asked for."""
    step = FakeStep()
    limit_maps(monkeypatch, step)
    compiled = compiled_with(step)
    for rows in (1, 2, 3, 4):
        compiled.get(call(rows))
    assert compiled.map_share() == 0.5 and compiled.dropped == 0
    compiled.get(call(1))  # used again: now the most recent but one
    compiled.get(call(5))
    assert compiled.dropped == 1 and not compiled.has(call(2))
    assert all(compiled.has(call(r)) for r in (1, 3, 4, 5)) and compiled.map_share() == 0.5
    assert "dropped the 1 least recently used" in caplog.text
    compiled.get(call(2))  # compiled again, dropping the next oldest
    assert [shapes[0][0] for shapes, _ in step.compiles] == [1, 2, 3, 4, 5, 2]
    assert not compiled.has(call(3)) and compiled.dropped == 2


def test_without_the_systems_figures_nothing_is_dropped(monkeypatch):
    step = FakeStep()
    monkeypatch.setattr(compiled_steps, "memory_map_limit", lambda: None)
    compiled = compiled_with(step)
    for rows in range(1, 9):
        compiled.get(call(rows))
    assert compiled.map_share() is None and compiled.dropped == 0 and len(step.live) == 8
