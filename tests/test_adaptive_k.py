"""Adaptive K: the rule on a sequence's own counts, and through the engine greedy output equal to plain
decoding while a draft that is rarely right proposes fewer tokens, with the request's acceptance logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxrs import LLM
from jaxrs.engine.adaptive_k import EVIDENCE, DraftRecord, next_k
from jaxrs.engine.speculative_config import SpeculativeConfig
from jaxrs.errors import JaxrsError
from tests.test_speculative import ENGINE, GREEDY, VOCAB, tiny


def record(*steps: tuple[int, int]) -> DraftRecord:
    r = DraftRecord()
    for proposed, kept in steps:
        r.add(proposed, kept)
    return r


def test_full_k_until_there_is_evidence():
    assert next_k(8, None) == 8
    assert next_k(8, record((4, 0))) == 8  # 4 proposed < EVIDENCE
    assert EVIDENCE <= 8


def test_k_follows_the_estimated_acceptance():
    assert next_k(8, record(*[(8, 0)] * 3)) == 1  # never right: one draft
    assert next_k(8, record(*[(8, 8)] * 3)) == 8  # always right: all of K
    assert next_k(8, record(*[(4, 1)] * 4)) == 2  # a = 1/2: positions reached >= 25% of the time
    assert next_k(8, record(*[(4, 3)] * 4)) == 4  # a = 3/4 -> 4
    assert next_k(3, record(*[(4, 3)] * 4)) == 3  # never above K


def test_record_metrics_and_steps_without_drafts():
    r = record((4, 2), (0, 0), (4, 4))
    assert (r.steps, r.proposed, r.accepted, r.rejections) == (2, 8, 6, 1)
    assert r.acceptance_rate == 0.75 and r.mean_accepted_length == 4.0


def test_config_key_is_checked():
    assert SpeculativeConfig.parse(
        {"method": "ngram", "num_speculative_tokens": 2, "adaptive_k": True}
    ).adaptive_k
    with pytest.raises(JaxrsError, match="adaptive_k"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "adaptive_k": "yes"})


def test_engine_lowers_k_and_keeps_the_output(tmp_path, caplog):
    target, draft = tiny(tmp_path / "target", 2, 0), tiny(tmp_path / "draft", 1, 1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (3, 7)]
    plain = [o.token_ids for o in LLM(target, **ENGINE).generate(prompts, GREEDY)]
    spec = {"model": draft, "num_speculative_tokens": 3, "adaptive_k": True}
    llm = LLM(target, speculative_config=spec, **ENGINE)
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == plain
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens < 3 * stats.num_drafts, "a rarely-right draft kept proposing K"
    lines = [r.getMessage() for r in caplog.records if "mean accepted length" in r.getMessage()]
    assert len(lines) == len(prompts) and "acceptance" in lines[0]
