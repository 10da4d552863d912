"""Attention over whole sequences (no cache): encoders, text encoders and diffusion transformers.

One pure function for every model that sees all its keys at once; each model adds its own mask or
position bias through `bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias: jax.Array | None = None
) -> jax.Array:
    """softmax(scale * q k^T + bias) v over heads-major `[B, H, T, D]` arrays; `bias` broadcasts to
    `[B, H, Tq, Tk]`. Scores and the softmax are f32; the weights are normalized after the product with
    the values, which XLA:CPU ran 4.4x faster than a softmax then a product (32 x 192 tokens)."""
    scores = jnp.matmul(q * scale, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)
