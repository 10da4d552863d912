"""Sizes rounded up to powers of two: tiles Triton accepts, and padded shapes that compile only a
handful of times however the true sizes vary."""

from __future__ import annotations

MIN_DOT_DIM = 16  # tl.dot wants every matmul dimension >= 16


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): 1 when both are <= 1."""
    return 1 << max(0, max(n, minimum) - 1).bit_length()


def next_half_octave(n: int, minimum: int = 1) -> int:
    """The smallest power of two, or three halves of one, >= max(n, minimum) (1, 2, 3, 4, 6, 8, 12, ...):
    about 1.2x padding on average instead of a power of two's 1.4x, for twice the sizes."""
    power = next_power_of_2(n, minimum)
    three_quarters = 3 * power // 4
    return three_quarters if power >= 4 and three_quarters >= max(n, minimum) else power
