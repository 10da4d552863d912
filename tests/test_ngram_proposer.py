"""Prompt-lookup proposals: the longest earlier suffix match, its continuation, or nothing."""

from __future__ import annotations

from jaxrs.engine.ngram_proposer import propose


def test_longest_suffix_wins():
    # suffix [2, 3] occurred after 7 (followed by 8 9) and [3] alone after 5 (followed by 6):
    ids = [5, 3, 6, 7, 2, 3, 8, 9, 1, 2, 3]
    assert propose(ids, 2, max_n=4, min_n=1) == [8, 9]
    assert propose(ids, 2, max_n=1, min_n=1) == [8, 9]  # the latest earlier [3]


def test_latest_occurrence_and_its_periodic_continuation():
    ids = [1, 2, 4, 1, 2, 5, 6, 1, 2]
    assert propose(ids, 2, max_n=2, min_n=2) == [5, 6]
    assert propose(ids, 5, max_n=2, min_n=2) == [5, 6, 1, 2, 5]  # past the end: the loop goes on
    assert propose([7, 7, 7, 7], 3, max_n=4, min_n=1) == [7, 7, 7]


def test_no_match_or_too_short():
    assert propose([1, 2, 3, 4], 3, max_n=4, min_n=1) == []
    assert propose([1, 2, 1, 2], 3, max_n=4, min_n=3) == []  # [2, 1, 2] never occurred before
    assert propose([4], 3, max_n=4, min_n=1) == []
