"""Constrained decode batches: the forward pass is dispatched before the masks are filled, the tokens
are those of masks filled first in one fused call, and free-only batches keep that single fused call."""

from __future__ import annotations

import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.structured import Grammar
from tests.structured_model import save_structured_model

PROMPTS = ["one", "x", "two", "y"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_structured_model(tmp_path_factory.mktemp("masked"))
    return LLM(str(path), kv_cache_mb=8, max_model_len=128, max_num_seqs=4, max_decode_steps=4)


def mixed_params() -> list[SamplingParams]:
    free = [SamplingParams(max_tokens=10, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2)]
    constrained = [
        SamplingParams(max_tokens=24, temperature=1.0, seed=7, grammar=Grammar.json_object()),
        SamplingParams(max_tokens=24, temperature=0.0, grammar=Grammar.regex(r"[a-z]{2,8}-[0-9]{1,3}")),
    ]
    return [free[0], constrained[0], free[1], constrained[1]]


@pytest.fixture
def events(llm, monkeypatch):
    """What the runner and the grammar compiler do, in order: step calls by kind, and mask fills
    (with whether a forward's logits were then held on the device, not yet sampled)."""
    runner, compiler = llm.engine.runner, llm.engine.grammars
    seen: list[str] = []
    run, fill = runner._run, compiler.fill

    def recording_run(call, fetch, compiled=None):
        seen.append(call.kind)
        return run(call, fetch, compiled)

    def recording_fill(rows, masks):
        seen.append("fill while held" if runner.held is not None else "fill")
        return fill(rows, masks)

    monkeypatch.setattr(runner, "_run", recording_run)
    monkeypatch.setattr(compiler, "fill", recording_fill)
    return seen


def test_masks_are_filled_after_the_forward_is_dispatched(llm, events):
    llm.generate(PROMPTS, mixed_params(), use_tqdm=False)
    # Each constrained decode iteration: the forward dispatched, the masks filled while its logits
    # wait on the device, then the sampler; never the fused call while a constrained row runs.
    assert events.count("logits") >= 10 and "decode" not in events
    for i, e in enumerate(events):
        if e == "logits":
            assert events[i + 1 : i + 3] == ["fill while held", "sample"], events[i : i + 3]
        if e == "sample":
            assert events[i - 1] == "fill while held"
    # The prefill's first-token masks are filled before its (fused) call, as before.
    assert events.count("fill") >= 1


def test_tokens_equal_masks_filled_first_and_free_rows_equal_a_free_only_run(llm):
    params = mixed_params()
    overlapped = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    llm.engine.runner.overlap_masks = False
    try:
        fused = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.runner.overlap_masks = True
    assert overlapped == fused
    alone = llm.generate([PROMPTS[0], PROMPTS[2]], [params[0], params[2]], use_tqdm=False)
    assert [overlapped[0], overlapped[2]] == [o.token_ids for o in alone]
    assert len(overlapped[0]) == 10


def test_free_batches_keep_one_fused_call_and_no_new_shapes(llm, events):
    free = [SamplingParams(max_tokens=9, temperature=t, seed=3, ignore_eos=True) for t in (0.0, 0.7)]
    llm.generate(PROMPTS[:2], free, use_tqdm=False)  # compiles what free batches need
    shapes = llm.engine.runner.compile_count()
    events.clear()
    out = llm.generate(PROMPTS[:2], free, use_tqdm=False)
    assert set(events) == {"prefill", "decode"}
    assert events.count("decode") == 2  # 8 tokens after the prefill's: two 4-token calls
    assert all(len(o.token_ids) == 9 for o in out)
    assert llm.engine.runner.compile_count() == shapes


def test_constrained_steps_are_warmed_only_once_a_grammar_comes(tmp_path):
    path = save_structured_model(tmp_path)
    llm = LLM(
        str(path),
        kv_cache_mb=8,
        max_model_len=64,
        max_num_seqs=2,
        max_num_batched_tokens=16,
        max_decode_steps=4,
    )
    runner = llm.engine.runner
    warm = llm.warmup(background=True)
    assert warm.wait(300) and {s[0] for s in runner.shapes} == {"decode", "prefill"}
    assert runner.masked_warming is None
    assert llm.engine.grammars is not None  # the first constrained request builds it
    assert runner.masked_warming is not None and runner.masked_warming.wait(300)
    assert {s for s in runner.shapes if s[0] in ("logits", "sample")} == {
        ("logits", 1, 4),  # 64 tokens: one width bucket, at most 4 blocks
        ("logits", 2, 4),
        *{("sample", b, "sampled+filters") for b in (1, 2)},  # greedy batches share the sampled one
    }
    shapes = runner.compile_count()
    out = llm.generate(PROMPTS[:2], mixed_params()[:2], use_tqdm=False)
    assert runner.compile_count() == shapes and out[1].outputs[0].finish_reason in ("stop", "length")


def test_the_two_calls_travel_to_follower_processes(llm, monkeypatch):
    """Processes following process 0 take each step call pickled: the sample call names the held
    logits by shape, so it pickles and keeps its compiled signature."""
    from jaxrs.engine.compiled_steps import signature
    from jaxrs.parallel.multihost import decode, encode

    published = []
    monkeypatch.setattr(llm.engine.runner, "on_step", published.append)
    llm.generate(PROMPTS[1:2], [mixed_params()[1]], use_tqdm=False)
    calls = [c for c in published if c.kind in ("logits", "sample")]
    assert {c.kind for c in calls} == {"logits", "sample"}
    for call in calls:
        assert signature(decode(encode(call))) == signature(call)
