"""Mixed per-layer formats moved to one format so the layers stack packed."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxrs.quant import dequantize, quantize
from jaxrs.quant.transcode import CPU_LAYOUT, cpu_layout, host_values, to_format, unify_formats
from tests.conftest import relative_error

RNG = np.random.default_rng(7)


def weights(out: int = 8, in_: int = 512) -> np.ndarray:
    return (RNG.standard_normal((out, in_)) * RNG.uniform(0.01, 2.0, (out, 1))).astype(np.float32)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_0"])
def test_symmetric_blocks_move_to_q8_0_exactly(fmt):
    qt = quantize(weights(), fmt)
    moved = to_format(qt, "Q8_0")
    assert moved.fmt == "Q8_0"
    np.testing.assert_array_equal(np.asarray(dequantize(moved)), np.asarray(dequantize(qt)))


@pytest.mark.parametrize("fmt", sorted(CPU_LAYOUT))
def test_cpu_layouts_hold_the_same_values(fmt):
    """Each format XLA:CPU reads slowly moves into its byte-per-weight layout (host NumPy work) with every
    value kept, stacked layers included."""
    qt = quantize(weights().reshape(2, 4, 512), fmt)
    moved = to_format(qt, CPU_LAYOUT[fmt])
    assert moved.fmt == CPU_LAYOUT[fmt] and moved.shape == qt.shape
    np.testing.assert_array_equal(np.asarray(dequantize(moved)), np.asarray(dequantize(qt)))


@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_0", "Q8_0"])
def test_symmetric_blocks_move_to_q8f_exactly_with_f32_scales(fmt):
    qt = quantize(weights(), fmt)
    moved = cpu_layout(qt)
    assert CPU_LAYOUT[fmt] == "Q8F" and moved.fmt == "Q8F"
    assert moved.arrays["d"].dtype == np.float32 and moved.arrays["qs"].dtype == np.int8
    np.testing.assert_array_equal(np.asarray(dequantize(moved)), np.asarray(dequantize(qt)))


def test_q8f_quantizes_to_q8_0s_values():
    w = weights()
    np.testing.assert_array_equal(
        np.asarray(dequantize(quantize(w, "Q8F"))), np.asarray(dequantize(quantize(w, "Q8_0")))
    )


@pytest.mark.parametrize(("src", "dst", "bound"), [("Q4_K", "Q6_K", 0.02), ("Q4_1", "Q8_0", 0.01)])
def test_other_formats_are_requantized_close(src, dst, bound):
    qt = quantize(weights(), src)
    moved = to_format(qt, dst)
    assert moved.fmt == dst
    error = relative_error(np.asarray(dequantize(moved)), np.asarray(dequantize(qt)))
    assert 0 < error < bound


def test_unify_picks_the_format_with_most_bits(caplog):
    w = weights()
    same = [quantize(w, "Q4_K"), quantize(w, "Q4_K")]
    assert unify_formats(same) == same
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        mixed = unify_formats([quantize(w, "Q5_0"), quantize(w, "Q8_0"), quantize(w, "Q4_0")], "v_proj")
    assert [t.fmt for t in mixed] == ["Q8_0"] * 3
    assert "v_proj: layers in Q4_0 (1), Q5_0 (1) stored as Q8_0" in caplog.text and "exactly" in caplog.text


@pytest.mark.parametrize("fmt", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q8_0"])
def test_host_values_of_a_re_quantized_layer_are_the_device_dequantization(fmt):
    """`to_format` reads a layer's values on the host (no JAX executable per shape while loading):
    bit-identical to `dequantize`, so the re-quantized layer is what it was."""
    qt = quantize(weights(16, 512), fmt)
    np.testing.assert_array_equal(host_values(qt), np.asarray(dequantize(qt)))
