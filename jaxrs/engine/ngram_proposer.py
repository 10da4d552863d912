"""Prompt-lookup proposals: draft tokens copied from the sequence's own earlier tokens.

The longest suffix of the sequence (at most `max_n`, at least `min_n` tokens) that occurred before is
found, and the `k` tokens that followed its latest earlier occurrence are proposed (where they run
into the sequence's end, the continuation repeats itself: a loop stays a loop). Code edits, quotes and
summaries repeat their input, so such proposals are often right, at no model cost. As a distribution
the proposal is one-hot, which the rejection rule handles exactly (see `rejection_sampling`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(token_ids: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to `k` draft tokens continuing `token_ids`; empty when no suffix of `min_n`..`max_n` tokens
    occurred earlier."""
    ids = np.asarray(token_ids, np.int64)
    n_tokens = len(ids)
    for n in range(min(max_n, n_tokens - 1), min_n - 1, -1):
        suffix = ids[n_tokens - n :]
        # windows starting at 0 .. n_tokens - n - 1: every earlier occurrence, the suffix itself excluded
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # after the latest earlier occurrence
            out: list[int] = []
            for i in range(start, start + k):  # past the end, the continuation repeats itself
                out.append(int(ids[i]) if i < n_tokens else out[i - n_tokens])
            return out
    return []
