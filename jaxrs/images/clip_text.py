"""CLIP's text encoder (`CLIPTextModel`) as a `flax.nnx` module: FLUX conditions on its pooled output,
the final hidden state at the end-of-text token.

Pre-LayerNorm layers under a causal mask, stacked and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.config import ACTIVATIONS
from jaxrs.models.dense_attention import attend
from jaxrs.models.layers import activation
from jaxrs.models.nn import Embedding, LayerNorm, Linear, value
from jaxrs.ops import Kernels

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str
    eos_token_id: int

    @classmethod
    def from_dict(cls, raw: dict) -> ClipTextConfig:
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            max_position_embeddings=raw.get("max_position_embeddings", 77),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            hidden_act=raw.get("hidden_act", "quick_gelu"),
            eos_token_id=raw.get("eos_token_id", 2),
        )


def clip_activation(x: jax.Array, kind: str) -> jax.Array:
    """CLIP's quick_gelu (`x * sigmoid(1.702 x)`), or one of the shared activations."""
    if kind == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return activation(x, ACTIVATIONS.get(kind, kind))


class ClipLayer(nnx.Module):
    def __init__(self, cfg: ClipTextConfig):
        hidden = cfg.hidden_size
        self.layer_norm1 = LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.q_proj = Linear(hidden, hidden, bias=True)
        self.k_proj = Linear(hidden, hidden, bias=True)
        self.v_proj = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)
        self.layer_norm2 = LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.fc1 = Linear(hidden, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, hidden, bias=True)
        self.heads, self.act = cfg.num_heads, cfg.hidden_act

    def __call__(self, h: jax.Array, mask: jax.Array, kernels: Kernels) -> jax.Array:
        batch, length, hidden = h.shape
        x = self.layer_norm1(h)

        def heads(proj: Linear) -> jax.Array:
            return proj(x, kernels).reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

        head_dim = hidden // self.heads
        out = attend(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), scale=head_dim**-0.5, bias=mask
        )
        h = h + self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, hidden), kernels)
        return h + self.fc2(clip_activation(self.fc1(self.layer_norm2(h), kernels), self.act), kernels)


class ClipTextModel(nnx.Module):
    """Tokens `[B, T]` -> (last hidden states `[B, T, hidden]`, pooled `[B, hidden]`)."""

    def __init__(self, cfg: ClipTextConfig):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nnx.vmap(lambda _: ClipLayer(cfg), in_axes=0, out_axes=0)(jnp.arange(cfg.num_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.eos_token_id = cfg.eos_token_id

    def __call__(self, tokens: jax.Array, kernels: Kernels = Kernels()) -> tuple[jax.Array, jax.Array]:
        length = tokens.shape[1]
        dtype = value(self.final_layer_norm.weight).dtype
        h = self.token_embedding(tokens, dtype) + self.position_embedding(jnp.arange(length), dtype)[None]
        causal = jnp.where(jnp.arange(length)[:, None] >= jnp.arange(length)[None, :], 0.0, NEG_INF)
        graph, stacked = nnx.split(self.layers)

        def body(h: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graph, state)(h, causal, kernels), None

        h, _ = jax.lax.scan(body, h, stacked)
        h = self.final_layer_norm(h)
        # transformers' rule: the first end-of-text token, or the largest id for configs that say 2
        ends = tokens if self.eos_token_id == 2 else (tokens == self.eos_token_id).astype(jnp.int32)
        pooled = h[jnp.arange(tokens.shape[0]), jnp.argmax(ends, axis=-1)]
        return h, pooled


CLIP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "position_embedding.weight": "text_model.embeddings.position_embedding.weight",
    "final_layer_norm.weight": "text_model.final_layer_norm.weight",
    "final_layer_norm.bias": "text_model.final_layer_norm.bias",
    **{
        f"layers.*.{p}.{kind}": f"self_attn.{p}.{kind}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        for kind in ("weight", "bias")
    },
    **{f"layers.*.{p}.{kind}": f"mlp.{p}.{kind}" for p in ("fc1", "fc2") for kind in ("weight", "bias")},
}
CLIP_STACKS = {"layers": "text_model.encoder.layers.{i}."}
