"""Power-of-two sizes: the one rounding the kernels' tiles and the engine's padded shapes share."""

from __future__ import annotations

from pallas_kernels.shapes import MIN_DOT_DIM, next_power_of_2


def test_rounds_up_to_a_power_of_two():
    assert [next_power_of_2(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert next_power_of_2(1024) == 1024 and next_power_of_2(1025) == 2048


def test_minimum_and_empty_sizes():
    assert next_power_of_2(3, MIN_DOT_DIM) == 16 and next_power_of_2(17, MIN_DOT_DIM) == 32
    assert next_power_of_2(5, 8) == 8 and next_power_of_2(0, 4) == 4
    assert next_power_of_2(0) == 1 and next_power_of_2(-3) == 1
