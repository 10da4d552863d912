"""A packed head's logits a vocabulary slice at a time: the same numbers, a fraction of the temporary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.models import head_slices
from jaxrs.models.nn import head_logits
from jaxrs.ops import Kernels
from jaxrs.quant import dequantize, quantize
from pallas_kernels import qmatmul


@pytest.mark.parametrize(
    "out, inp, limit, expected",
    [
        (1024, 64, 2**40, 1),  # fits: no slicing
        (1024, 64, 64 * 1024, 4),  # 256 KiB of f32 in 64 KiB slices
        (1000, 64, 64 * 1024, 4),  # 3.9 slices needed -> 4 divides 1000
        (1021, 64, 64 * 1024, 1),  # a prime row count: no slice count near 4 divides it
    ],
)
def test_slice_count(out, inp, limit, expected):
    assert head_slices.slice_count(out, inp, limit) == expected


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "U8M"])
def test_sliced_head_gives_the_same_logits_with_a_smaller_temporary(monkeypatch, fmt):
    rng = np.random.default_rng(0)
    head = quantize(rng.normal(size=(2048, 256)).astype(np.float32), fmt)
    hidden = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    kernels = Kernels()

    def run():
        step = jax.jit(lambda h, w: head_logits(w, h, kernels)).lower(hidden, head).compile()
        return np.asarray(step(hidden, head)), step.memory_analysis().temp_size_in_bytes

    # the slices matter where the product writes the head out whole: past the few-row products
    monkeypatch.setattr(qmatmul, "CPU_FEW_ROWS", 1)
    monkeypatch.setattr(head_slices, "SLICE_BYTES", 2**40)
    whole, whole_temp = run()
    monkeypatch.setattr(head_slices, "SLICE_BYTES", 256 * 1024)  # 2 MiB of f32 head -> 8 slices
    sliced, sliced_temp = run()
    np.testing.assert_array_equal(sliced, whole)
    assert sliced.shape == (3, 2048)
    assert sliced_temp < whole_temp / 2, (sliced_temp, whole_temp)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the head is sliced on CPU")
@pytest.mark.parametrize(
    "rows, kernel, sliced",
    [(1, "xla", True), (5, "xla", False), (65, "xla", True), (3, "xla_bf16", False), (5, "xla_bf16", True)],
)
def test_few_rows_read_the_head_whole(monkeypatch, rows, kernel, sliced):
    """2..64 rows: the few-row product reads the head a tile at a time itself, so it takes the head
    whole; one row (its fused product) and more than 64 rows keep the slices, and so do 4 rows or more
    under bfloat16 GEMMs (one GEMM, which writes its weight out)."""
    rng = np.random.default_rng(rows)
    head = quantize(rng.normal(size=(2048, 256)).astype(np.float32), "Q8F")
    hidden = jnp.asarray(rng.normal(size=(rows, 256)), jnp.float32)
    monkeypatch.setattr(head_slices, "SLICE_BYTES", 256 * 1024)
    counts = []
    monkeypatch.setattr(head_slices, "slice_count", lambda *a: counts.append(a) or 8)
    kernels = Kernels.from_mapping({"qmatmul": kernel})
    logits = np.asarray(jax.jit(lambda h, w: head_logits(w, h, kernels))(hidden, head))
    assert bool(counts) == sliced
    ref = np.asarray(hidden @ dequantize(head).T)
    rounding = 1e-5 if kernel == "xla" or rows < qmatmul.CPU_GEMM_ROWS else 1e-2  # bfloat16 operands
    np.testing.assert_allclose(logits, ref, rtol=0, atol=rounding * np.abs(ref).max())
