"""How many ways to split a kernel's reduction loop so that a small grid still fills a GPU.

A batch-1 decode step gives the kernels few programs: paged attention one per kv head (8 for Llama-3-8B),
qmatmul one per 64 output features (16 for its k/v projections). A GPU runs a program per SM at a time
(an H100 or H200 has 132), so such grids leave most SMs idle while each program streams its whole
reduction. Splitting the reduction (KV length, `in` features) over more programs, and combining their
partial results outside, fills the machine: flash-decoding for attention, split-K for matmuls.

These are predictions for GPUs; `bench/gpu.py` measures them against no split. In interpret mode the
programs run one after another, so the kernels split only when compiled.
"""

from __future__ import annotations

TARGET_PROGRAMS = 256  # about two programs per SM of a 132-SM GPU
MAX_SPLITS = 16  # bounds the partial results written and combined


def auto_splits(programs: int, steps: int) -> int:
    """Splits of a `steps`-long loop that bring a grid of `programs` up to about `TARGET_PROGRAMS`,
    with at least two steps per split: 1 when the grid is already large or the loop short."""
    wanted = -(-TARGET_PROGRAMS // max(programs, 1))
    return max(1, min(wanted, steps // 2, MAX_SPLITS))


def even_splits(splits: int, steps: int) -> tuple[int, int]:
    """(splits, steps per split) for `steps` shared out as evenly as possible, none left empty."""
    steps = max(steps, 1)
    splits = max(1, min(splits, steps))
    per_split = -(-steps // splits)
    return -(-steps // per_split), per_split
