"""`pallas_kernels.dequant`: packed weights into bfloat16 the way a convert rounds them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.quant import quantize
from pallas_kernels.dequant import dequantize_packed, round_to_bfloat16


def _bf16_bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


def test_round_to_bfloat16_is_the_convert_bit_for_bit():
    """Nearest even on every kind of f32 a weight can be: random magnitudes over the whole range, exact
    ties (an odd 9-bit integer times a power of two: its low half is 0x8000), products of small codes and
    scales, subnormals, zeros, the largest finite values (rounded past bfloat16's range) and infinities."""
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal(200_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-37, 38, 200_000),
        ((2 * rng.integers(128, 256, 10_000) + 1) * 2.0 ** rng.integers(-40, 40, 10_000)).astype(np.float32),
        (rng.integers(-128, 128, 50_000) * np.float32(0.0123)).astype(np.float32),
        np.array([0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38, np.inf, -np.inf, 1 + 2**-8], np.float32),
    ]
    x = jnp.asarray(np.concatenate(values))
    ties = np.asarray(values[1]).view(np.uint32) & 0xFFFF
    assert (ties == 0x8000).all()  # half of them round down (to the even neighbour), half up
    np.testing.assert_array_equal(_bf16_bits(round_to_bfloat16(x)), _bf16_bits(x.astype(jnp.bfloat16)))


@pytest.mark.parametrize("fmt", ["U8M", "Q8F", "Q4_0", "Q4_K", "Q6_K", "F32", "F16"])
def test_a_weight_dequantized_into_bfloat16_is_its_f32_form_converted(fmt, monkeypatch):
    """The integer rounding (CPU) and XLA's convert give the same bfloat16 weights."""
    rng = np.random.default_rng(1)
    qt = quantize(rng.standard_normal((8, 512)).astype(np.float32), fmt)
    whole = dequantize_packed(qt.arrays, fmt=fmt, out_in=qt.out_in)
    ours = dequantize_packed(qt.arrays, fmt=fmt, out_in=qt.out_in, dtype=jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bf16_bits(ours), _bf16_bits(whole.astype(jnp.bfloat16)))
    monkeypatch.setattr("pallas_kernels.dequant.BF16_BY_INTEGER_ROUNDING", False)
    theirs = dequantize_packed(qt.arrays, fmt=fmt, out_in=qt.out_in, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(_bf16_bits(ours), _bf16_bits(theirs))
