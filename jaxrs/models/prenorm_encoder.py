"""The pre-LayerNorm transformer encoder layer that CLIP's vision and text towers and SigLIP share:
`h + attn(norm1(h))`, then `h + mlp(norm2(h))`, attention over whole sequences with an optional additive
bias (a padding or causal mask). Attributes carry transformers' names (`layer_norm1`,
`self_attn.q_proj`, `mlp.fc1`...), so a parameter path is its checkpoint name under the layer's prefix.
"""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx

from jaxrs.config import ACTIVATIONS
from jaxrs.models.dense_attention import attend
from jaxrs.models.layers import activation
from jaxrs.models.nn import LayerNorm, Linear
from jaxrs.ops import Kernels

DENSE = Kernels()  # the towers run dense float weights unless a caller passes other ops
NAMED_ACTIVATIONS = {**ACTIVATIONS, "gelu_fast": "gelu_tanh"}  # transformers' name -> `activation`'s


class EncoderShape(Protocol):
    """What a layer needs of its model's config (CLIP's and SigLIP's configs all say it so)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str


def encoder_activation(x: jax.Array, kind: str) -> jax.Array:
    """transformers' `hidden_act` by name: CLIP's quick_gelu (`x * sigmoid(1.702 x)`) or a shared one."""
    if kind == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return activation(x, NAMED_ACTIVATIONS.get(kind, kind))


class SelfAttention(nnx.Module):
    """Multi-head attention of every position over every key, plus `bias` (broadcast to `[B, H, T, T]`)."""

    def __init__(self, hidden: int, heads: int):
        self.q_proj = Linear(hidden, hidden, bias=True)
        self.k_proj = Linear(hidden, hidden, bias=True)
        self.v_proj = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)
        self.heads = heads

    def __call__(self, x: jax.Array, bias: jax.Array | None, kernels: Kernels) -> jax.Array:
        b, t, d = x.shape

        def heads(proj: Linear) -> jax.Array:
            return proj(x, kernels).reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3)

        scale = (d // self.heads) ** -0.5
        out = attend(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), scale=scale, bias=bias)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, t, d), kernels)


class MLP(nnx.Module):
    """`fc2(act(fc1(x)))` with biases."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        self.fc1 = Linear(hidden, intermediate, bias=True)
        self.fc2 = Linear(intermediate, hidden, bias=True)
        self.act = act

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        return self.fc2(encoder_activation(self.fc1(x, kernels), self.act), kernels)


class PreNormLayer(nnx.Module):
    """Pre-LN: `h + self_attn(layer_norm1(h))`, then `h + mlp(layer_norm2(h))`."""

    def __init__(self, cfg: EncoderShape):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def __call__(self, h: jax.Array, bias: jax.Array | None = None, kernels: Kernels = DENSE) -> jax.Array:
        h = h + self.self_attn(self.layer_norm1(h), bias, kernels)
        return h + self.mlp(self.layer_norm2(h), kernels)
