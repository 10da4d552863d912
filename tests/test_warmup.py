"""The warm-up: the first shapes before serving, the rest in a background thread, none compiled twice
when the engine needs one first; then the same with a tiny real model."""

from __future__ import annotations

import logging
import threading

import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.engine import runner as runner_module
from jaxrs.engine.warmup import Warmup
from pallas_kernels import paged_attention
from tests.conftest import save_tiny_llama
from tests.test_compiled_steps import FakeStep, call, compiled_with, limit_maps

ROWS = [1, 2, 4, 8, 16]


def compiled_rows(step: FakeStep) -> list[int]:
    return sorted(shapes[0][0] for shapes, _ in step.compiles)


def test_first_shapes_now_the_rest_in_the_background_each_once(caplog):
    gate = threading.Event()
    step = FakeStep(gate, held=lambda rows: rows >= 4)  # the background's compiles wait for the gate
    compiled = compiled_with(step)
    warmup = Warmup(compiled, [call(r) for r in ROWS], first=2)
    with caplog.at_level(logging.INFO, "jaxrs"):
        warmup.run(background=True)  # returns once rows 1 and 2 are compiled
        assert compiled_rows(step) == [1, 2] and warmup.thread is not None
        for _ in range(3):  # rows 1, 2, then the background's first
            assert step.started.acquire(timeout=10)
        assert warmup.pending == 2  # 8 and 16: not started; 4 is compiling
        engine_side = [threading.Thread(target=compiled.get, args=(call(r, value=9),)) for r in (4, 16)]
        for t in engine_side:  # the engine needs 4 (compiling in the background) and 16 (not yet)
            t.start()
        assert step.started.acquire(timeout=10)  # 16 compiles on the engine's side, 4 is waited for
        assert not warmup.wait(0.2)
        gate.set()
        for t in engine_side:
            t.join(10)
        assert warmup.wait(10)
    assert compiled_rows(step) == ROWS  # every shape once, none twice
    assert warmup.pending == 0
    text = caplog.text
    assert "2 step shapes ready" in text and "compiling 3 more in the background" in text
    assert "warm-up complete: 2 step shapes" in text and "1 more were compiled on first use" in text


def test_the_background_stops_short_of_the_memory_maps_share(monkeypatch, caplog):
    """Past `WARMUP_MAP_SHARE` of the memory maps the system allows, the background compiles no more
    (before executables would be dropped); the shapes left compile on first use, and none is reported
    pending (/health's `compiling`)."""
    step = FakeStep()
    limit_maps(monkeypatch, step, limit=1000, each=100)  # three executables fill 0.4 of it, four pass it
    compiled = compiled_with(step)
    warmup = Warmup(compiled, [call(r) for r in ROWS], first=1)
    with caplog.at_level(logging.INFO, "jaxrs"):
        warmup.run(background=True)
        assert warmup.wait(10)
    assert compiled_rows(step) == [1, 2, 4, 8] and warmup.pending == 0 and compiled.dropped == 0
    assert "warm-up stopped with 1 step shapes left, which compile on first use" in caplog.text
    assert "warm-up complete" not in caplog.text
    compiled.get(call(16))  # on first use
    assert compiled.has(call(16))


def test_stop_ends_the_background_after_its_compile():
    gate = threading.Event()
    step = FakeStep(gate, held=lambda rows: rows >= 4)
    warmup = Warmup(compiled_with(step), [call(r) for r in ROWS], first=2)
    warmup.run(background=True)
    for _ in range(3):
        assert step.started.acquire(timeout=10)
    warmup.stop()
    gate.set()
    assert warmup.wait(10)
    assert compiled_rows(step) == [1, 2, 4] and warmup.pending == 2


def test_without_background_everything_compiles_now():
    step = FakeStep()
    warmup = Warmup(compiled_with(step), [call(r) for r in ROWS], first=2)
    warmup.run(background=False)
    assert warmup.thread is None and warmup.wait(0) and compiled_rows(step) == ROWS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_engine_serves_while_the_background_compiles(tiny):
    llm = LLM(
        str(tiny),
        kv_cache_tokens=64,
        block_size=8,
        max_model_len=16,
        max_num_seqs=2,
        max_num_batched_tokens=16,
        max_decode_steps=4,
    )
    runner = llm.engine.runner
    calls, first = runner.warmup_calls([SamplingParams(temperature=0), SamplingParams(temperature=1)])
    assert [c.label[:1] for c in calls[:first]] == [(1,)] * first  # one row first
    assert {c.kind for c in calls[:first]} == {"decode", "prefill"}
    warmup = llm.warmup(background=True)
    assert runner.compile_count() >= warmup.first
    assert llm.engine.stats().pending_shapes == warmup.pending
    out = llm.generate(["w3 w4 w5"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].token_ids) == 4
    assert warmup.wait(300)
    assert llm.engine.stats().pending_shapes == 0
    assert runner.compile_count() == len(warmup.calls) == len(runner.shapes)  # each shape once
    again = llm.generate(["w3 w4 w5"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert again[0].token_ids == out[0].token_ids and runner.compile_count() == len(warmup.calls)


def test_an_engine_whose_executables_are_dropped_serves_the_same_tokens(tiny, monkeypatch):
    """A system allowing few memory maps: past half of them each new step shape drops the least recently
    used ones, which compile again when needed; the tokens are those of an engine that keeps them all."""
    from jaxrs.engine import compiled_steps
    from jaxrs.host_memory import memory_maps

    prompts = [["w3 w4 w5"], ["w1 w2", "w6 w7 w8 w9"], ["w3 w4 w5"]]
    params = SamplingParams(max_tokens=6, temperature=0)
    options = dict(kv_cache_tokens=64, block_size=8, max_model_len=32, max_num_seqs=2, max_decode_steps=4)
    kept = LLM(str(tiny), **options)
    expected = [[o.token_ids for o in kept.generate(p, params, use_tqdm=False)] for p in prompts]
    limited = LLM(str(tiny), **options)
    limit = 2 * memory_maps()  # at the share now
    monkeypatch.setattr(compiled_steps, "memory_map_limit", lambda: limit)
    got = [[o.token_ids for o in limited.generate(p, params, use_tqdm=False)] for p in prompts]
    assert got == expected
    compiled = limited.engine.runner.compiled
    assert compiled.dropped > 0 and len(compiled) > compiled.dropped  # some dropped, some still held


def test_long_chunks_pad_to_multiples_of_the_chunk_step(tiny, monkeypatch):
    """Past `CHUNK_STEP` tokens a chunk pads to the step's next multiple, not the next power of two; the
    warm-up lists those lengths, and a prompt's tokens are the same at either padding."""
    monkeypatch.setattr(runner_module, "CHUNK_STEP", 16)
    llm = LLM(
        str(tiny),
        kv_cache_tokens=256,
        block_size=8,
        max_model_len=96,
        max_num_seqs=1,
        max_num_batched_tokens=64,
        prefix_caching=False,
    )
    runner = llm.engine.runner
    assert [runner.chunk_len(n) for n in (1, 16, 17, 33, 48, 49, 64)] == [16, 16, 32, 48, 48, 64, 64]
    calls, _ = runner.warmup_calls([SamplingParams(temperature=0)])
    assert sorted({c.label[1] for c in calls if c.kind == "prefill"}) == [16, 32, 48, 64]
    prompt = [3 + i % 11 for i in range(40)]
    params = SamplingParams(max_tokens=6, temperature=0)
    stepped = llm.generate([prompt], params, use_tqdm=False)[0]
    assert ("prefill", 1, 48) in {c[:3] for c in runner.shapes}
    monkeypatch.setattr(runner_module, "CHUNK_STEP", 1 << 20)  # powers of two only, as before
    assert runner.chunk_len(40) == 64
    doubled = llm.generate([prompt], params, use_tqdm=False)[0]
    assert ("prefill", 1, 64) in {c[:3] for c in runner.shapes}
    assert doubled.token_ids == stepped.token_ids


def test_calls_take_the_widest_table_where_the_attention_costs_the_context(tiny, monkeypatch):
    """A decode over a table that narrows (NARROW_MIN_KEYS keys) and a prompt chunk over one of the tiled
    form's width (TILED_MIN_KEYS) cost what their rows' contexts need whatever the table's width, so from
    WIDEST_FROM_KEYS they take the widest table: one compiled shape for every longer context. Smaller
    tables, and every table under an attention without that rule, follow the context in powers of two;
    the tokens are the same."""
    monkeypatch.setattr(paged_attention, "TILED_MIN_KEYS", 128)  # 16 blocks of 8
    monkeypatch.setattr(runner_module, "WIDEST_FROM_KEYS", 128)
    llm = LLM(str(tiny), kv_cache_tokens=1024, block_size=8, max_model_len=500, max_num_seqs=2)
    runner = llm.engine.runner  # 500 tokens: 63 blocks, a 64-block table at most
    assert [runner.width(n, decode=True) for n in (1, 8, 9, 63)] == [8, 8, 64, 64]
    assert [runner.width(n) for n in (1, 8, 9, 16, 17, 63)] == [8, 8, 64, 64, 64, 64]
    assert runner.widths(decode=True) == [8, 64] == runner.widths()
    calls, first = runner.warmup_calls([SamplingParams(temperature=0)])
    decodes = [c.label[:2] for c in calls if c.kind == "decode"]
    assert sorted(decodes) == sorted({*decodes}) == [(1, 8), (1, 64), (2, 8), (2, 64)]
    assert [c.label[:2] for c in calls[:first] if c.kind == "decode"] == [(1, 8)]
    prompt = [3 + i % 11 for i in range(70)]  # 70 + 10 tokens: 10 blocks
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    widest = llm.generate([prompt], params, use_tqdm=False)[0]
    assert {("prefill", 1, 128, 64), ("decode", 1, 64)} <= {
        c[:4] if c[0] == "prefill" else c[:3] for c in runner.shapes
    }
    monkeypatch.setattr(runner_module, "WIDEST_FROM_KEYS", 512)  # a 64-block table only
    assert runner.widths(decode=True) == [8, 16, 32, 64] == runner.widths()
    monkeypatch.setattr(runner_module, "WIDEST_FROM_KEYS", 256)  # the default: from 32 blocks of 8
    assert runner.widths(decode=True) == [8, 16, 64] == runner.widths()
    monkeypatch.setattr(runner_module, "WIDEST_FROM_KEYS", 128)
    monkeypatch.setattr(runner_module, "attention_cost_follows_context", lambda *a, **k: False)
    assert runner.widths(decode=True) == [8, 16, 32, 64] == runner.widths()
    bucketed = llm.generate([prompt], params, use_tqdm=False)[0]
    assert ("decode", 1, 16) in {c[:3] for c in runner.shapes}
    assert bucketed.token_ids == widest.token_ids
