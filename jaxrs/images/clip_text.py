"""CLIP's text encoder (`CLIPTextModel`) as a `flax.nnx` module: FLUX conditions on its pooled output,
the final hidden state at the end-of-text token.

Pre-LayerNorm layers (`models.prenorm_encoder`) under a causal mask, stacked and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.models.nn import Embedding, LayerNorm, value
from jaxrs.models.prenorm_encoder import PreNormLayer
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


class ClipTextModel(nnx.Module):
    """Tokens `[B, T]` -> (last hidden states `[B, T, hidden]`, pooled `[B, hidden]`)."""

    def __init__(self, cfg: ClipTextConfig):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nnx.vmap(lambda _: PreNormLayer(cfg), in_axes=0, out_axes=0)(jnp.arange(cfg.num_layers))
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


# Paths under `layers` are the checkpoint's names under the layer prefix (`models.prenorm_encoder`).
CLIP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "position_embedding.weight": "text_model.embeddings.position_embedding.weight",
    "final_layer_norm.weight": "text_model.final_layer_norm.weight",
    "final_layer_norm.bias": "text_model.final_layer_norm.bias",
}
CLIP_STACKS = {"layers": "text_model.encoder.layers.{i}."}
