"""Sizes rounded up to powers of two: tiles Triton accepts, and padded shapes that compile only a
handful of times however the true sizes vary."""

from __future__ import annotations

MIN_DOT_DIM = 16  # tl.dot wants every matmul dimension >= 16


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): 1 when both are <= 1."""
    return 1 << max(0, max(n, minimum) - 1).bit_length()
