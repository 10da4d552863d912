"""Shared building blocks: the gated MLP's hidden row, computed as a division so that XLA:CPU computes it
once rather than inside every tile of the one-row product that reads it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.models import layers
from jaxrs.models.layers import activation, gated_activation


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation_is_the_activation_times_up(kind):
    rng = np.random.default_rng(0)
    gate = np.concatenate([rng.standard_normal(4000) * 4, [0.0, -0.0, 1e-30, -1e4, -100.0, 100.0, 1e4]])
    gate = jnp.asarray(gate, jnp.float32)
    up = jnp.asarray(rng.standard_normal(gate.shape), jnp.float32)
    got = gated_activation(gate, up, kind)
    want = activation(gate, kind) * up
    assert bool(jnp.all(jnp.isfinite(got)))  # no inf / inf where exp(-gate) overflows
    # tanh-gelu as x * sigmoid(2z) keeps the tail where 1 + tanh(z) cancels: ~1e-7 from the tanh form there
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_the_activation_form(dtype):
    gate = jnp.asarray([-12.0, -3.0, 0.5, 4.0], dtype)
    up = jnp.asarray([1.0, 2.0, -1.0, 0.25], dtype)
    np.testing.assert_array_equal(gated_activation(gate, up, "silu"), activation(gate, "silu") * up)


def test_an_unknown_activation_is_named():
    with pytest.raises(ValueError, match="relu6"):
        gated_activation(jnp.ones(3), jnp.ones(3), "relu6")


def _gemv_fusions_with(op: str, ends_in_division: bool, monkeypatch) -> int:
    """How many of the fusions holding a dot also compute `op`, in the compiled one-row down product."""
    monkeypatch.setattr(layers, "GATE_ENDS_IN_DIVISION", ends_in_division)

    def down(gate, up, w):
        return jnp.matmul(gated_activation(gate, up, "silu"), w.astype(jnp.float32).T)

    args = (jnp.ones((1, 256)), jnp.ones((1, 256)), jnp.ones((64, 256), jnp.int8))
    text = jax.jit(down).lower(*args).compile().as_text()
    bodies = text.split("\n\n")
    return sum(" dot(" in body and f" {op}(" in body for body in bodies)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion of one-row products")
def test_the_one_row_product_reads_the_hidden_row_not_its_recipe(monkeypatch):
    """As multiplications, XLA:CPU fuses `sigmoid(gate) * gate * up` into the GEMV that reads it (and
    recomputes it per tile of output rows); as a division it computes the row on its own."""
    assert _gemv_fusions_with("multiply", False, monkeypatch) > 0
    assert _gemv_fusions_with("divide", True, monkeypatch) == 0
    assert _gemv_fusions_with("multiply", True, monkeypatch) <= _gemv_fusions_with(
        "multiply", False, monkeypatch
    )
