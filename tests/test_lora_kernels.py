"""The `lora` op: the Pallas shrink/expand kernels (interpret mode) against the XLA reference and a NumPy
gather, on ragged shapes (`in`, `out` not multiples of the tiles, rank not a power of two), rows of every
slot mixed, and rows with no adapter."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrs import ops
from pallas_kernels.lora import lora_pallas, lora_xla


def gathered(x, a, b, slots):
    """y[row] = B[slot] @ A[slot] @ x[row], zero for slot -1, by explicit per-row copies."""
    out = np.zeros((*x.shape[:-1], b.shape[1]), np.float32)
    for row, slot in enumerate(slots):
        if slot >= 0:
            out[row] = x[row] @ a[slot].T @ b[slot].T
    return out


@pytest.mark.parametrize(
    "rows, tokens, in_features, out_features, num_slots, rank",
    [(5, 1, 40, 72, 3, 8), (3, 7, 96, 33, 4, 6), (8, 1, 64, 64, 1, 16)],
)
def test_pallas_equals_reference(rows, tokens, in_features, out_features, num_slots, rank):
    rng = np.random.default_rng(rows * 100 + rank)
    x = rng.normal(size=(rows, tokens, in_features)).astype(np.float32)
    a = rng.normal(size=(num_slots, rank, in_features)).astype(np.float32)
    b = rng.normal(size=(num_slots, out_features, rank)).astype(np.float32)
    slots = rng.integers(-1, num_slots, rows).astype(np.int32)
    slots[0], slots[-1] = -1, num_slots - 1  # a row without an adapter and one with the last slot
    want = gathered(x, a, b, slots)
    ref = np.asarray(lora_xla(x, a, b, slots))
    pallas = np.asarray(lora_pallas(x, a, b, slots, interpret=True, block_k=32, block_o=16))
    scale = np.abs(want).max()
    assert np.abs(ref - want).max() <= 1e-5 * scale
    assert np.abs(pallas - want).max() <= 1e-5 * scale
    assert np.all(pallas[slots == -1] == 0)


def test_registered_in_the_switchboard():
    assert ops.implementations("lora") == ["pallas", "xla"]
    assert ops.default_name("lora", "cpu") == "xla"
    x = jax.numpy.ones((2, 1, 8))
    a, b = jax.numpy.ones((2, 4, 8)), jax.numpy.ones((2, 8, 4))
    y = ops.Kernels.from_mapping({"lora": "pallas"}).get("lora")(x, a, b, np.array([1, -1], np.int32))
    assert np.asarray(y)[0, 0, 0] == 32 and np.all(np.asarray(y)[1] == 0)


def test_lowers_to_triton():
    """Compiled for a GPU (lowered here on CPU): both kernels go through Triton."""
    import functools

    x = jax.ShapeDtypeStruct((4, 1, 576), np.float32)
    a, b = jax.ShapeDtypeStruct((4, 16, 576), np.float32), jax.ShapeDtypeStruct((4, 1536, 16), np.float32)
    slots = jax.ShapeDtypeStruct((4,), np.int32)
    fn = jax.jit(functools.partial(lora_pallas, interpret=False))
    text = fn.trace(x, a, b, slots).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower() and "lora_shrink" in text and "lora_expand" in text
