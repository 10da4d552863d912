"""Split counts for small grids: enough programs to fill a GPU, never an empty split."""

from __future__ import annotations

import pytest

from pallas_kernels.occupancy import MAX_SPLITS, TARGET_PROGRAMS, auto_splits, even_splits


def test_large_grids_and_short_loops_are_not_split():
    assert auto_splits(TARGET_PROGRAMS, 1000) == 1
    assert auto_splits(10 * TARGET_PROGRAMS, 1000) == 1
    assert auto_splits(1, 3) == 1  # two steps per split at least


def test_small_grids_split_up_to_the_target_and_the_cap():
    assert auto_splits(64, 1000) == TARGET_PROGRAMS // 64
    assert auto_splits(100, 1000) == 3  # rounded up
    assert auto_splits(8, 1000) == MAX_SPLITS
    assert auto_splits(8, 10) == 5


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 17, 100])
@pytest.mark.parametrize("asked", [1, 2, 3, 7, 16, 200])
def test_even_splits_cover_every_step_and_leave_none_empty(steps, asked):
    splits, per_split = even_splits(asked, steps)
    assert 1 <= splits <= min(asked, steps)
    assert (splits - 1) * per_split < steps <= splits * per_split
