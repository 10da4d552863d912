"""BERT-family encoders (BertModel; RoBERTa/XLM-R, whose positions start after the padding id) as
`flax.nnx` modules: absolute position and token-type embeddings, post-LayerNorm layers, bidirectional
attention over a padding mask. Sentence-embedding models (all-MiniLM, BGE, E5...) are these plus pooling
(`jaxrs.embedding`).

Used functionally like the decoder: `model_graph(cfg)` builds the model abstractly, the loader fills its
state by parameter path (`load_encoder_params`, through the same `checkpoint.fill_params`), and the
jitted embedding step merges the two inside the trace. Layers are stacked and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.config import ACTIVATIONS
from jaxrs.errors import ModelLoadError
from jaxrs.models.layers import activation
from jaxrs.models.nn import Embedding, LayerNorm, Linear, value
from jaxrs.models.prenorm_encoder import SelfAttention
from jaxrs.ops import Kernels

NEG_INF = -1e30  # finite: a padding row's scores stay finite


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What an encoder's config.json says, normalized (hashable: a static argument of the jitted step)."""

    architecture: str  # "bert" | "roberta"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int = 0  # RoBERTa numbers positions from padding_idx + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        return self.max_position_embeddings - self.position_offset


ENCODER_ARCHITECTURES = {
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "RobertaModel": "roberta",
    "RobertaForMaskedLM": "roberta",
    "XLMRobertaModel": "roberta",
    "XLMRobertaForMaskedLM": "roberta",
}
ENCODER_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


def encoder_architecture(raw: dict) -> str | None:
    """ "bert" or "roberta" when config.json describes an encoder we run, else None."""
    for arch in raw.get("architectures") or []:
        if arch in ENCODER_ARCHITECTURES:
            return ENCODER_ARCHITECTURES[arch]
    if not raw.get("architectures"):
        return ENCODER_MODEL_TYPES.get(raw.get("model_type", ""))
    return None


def encoder_config(raw: dict, path: Path) -> EncoderConfig:
    """Normalize an encoder's config.json; an option we do not implement is a load error naming it."""
    arch = encoder_architecture(raw)
    if arch is None:
        raise ModelLoadError(path, f"not a BERT-family encoder ({raw.get('architectures')})")
    kind = raw.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ModelLoadError(path, f"unsupported position_embedding_type {kind!r} (supported: absolute)")
    act = raw.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(path, f"unsupported activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
    return EncoderConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        max_position_embeddings=raw.get("max_position_embeddings", 512),
        type_vocab_size=raw.get("type_vocab_size", 2),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        hidden_act=ACTIVATIONS[act],
        position_offset=raw.get("pad_token_id", 1) + 1 if arch == "roberta" else 0,
    )


class EncoderEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        self.word = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.offset = cfg.position_offset

    def __call__(self, tokens: jax.Array, token_types: jax.Array) -> jax.Array:
        dtype = value(self.norm.weight).dtype
        positions = jnp.arange(tokens.shape[1]) + self.offset
        h = (
            self.word(tokens, dtype)
            + self.position(positions, dtype)[None]
            + self.token_type(token_types, dtype)
        )
        return self.norm(h)


class EncoderLayer(nnx.Module):
    """Post-LN: `norm(h + attn(h))`, then `norm(h + down(act(up(h))))`."""

    def __init__(self, cfg: EncoderConfig):
        hidden = cfg.hidden_size
        self.attn = SelfAttention(hidden, cfg.num_heads)
        self.attn_norm = LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.up_proj = Linear(hidden, cfg.intermediate_size, bias=True)
        self.down_proj = Linear(cfg.intermediate_size, hidden, bias=True)
        self.mlp_norm = LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.act = cfg.hidden_act

    def __call__(self, h: jax.Array, key_bias: jax.Array, kernels: Kernels) -> jax.Array:
        h = self.attn_norm(h + self.attn(h, key_bias[:, None, None, :], kernels))
        mlp = self.down_proj(activation(self.up_proj(h, kernels), self.act), kernels)
        return self.mlp_norm(h + mlp)


class EncoderModel(nnx.Module):
    """Embeddings and the stacked layers; returns the last hidden states `[B, T, hidden]`."""

    def __init__(self, cfg: EncoderConfig):
        self.embed = EncoderEmbeddings(cfg)
        make = nnx.vmap(lambda _: EncoderLayer(cfg), in_axes=0, out_axes=0)
        self.layers = make(jnp.arange(cfg.num_layers))

    def __call__(self, tokens: jax.Array, lengths: jax.Array, kernels: Kernels) -> jax.Array:
        """`tokens` `[B, T]` right-padded; row b holds `lengths[b]` real tokens (token type 0)."""
        key_bias = jnp.where(jnp.arange(tokens.shape[1])[None, :] < lengths[:, None], 0.0, NEG_INF)
        h = self.embed(tokens, jnp.zeros_like(tokens))
        graph, stacked = nnx.split(self.layers)

        def body(h: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graph, state)(h, key_bias, kernels), None

        h, _ = jax.lax.scan(body, h, stacked)
        return h


@functools.cache
def model_graph(cfg: EncoderConfig) -> tuple[nnx.GraphDef, dict]:
    """The encoder's graph definition and abstract state (shapes only; nothing is allocated)."""
    graph, state = nnx.split(nnx.eval_shape(lambda: EncoderModel(cfg)))
    return graph, state.to_pure_dict()


def merge(params: dict, cfg: EncoderConfig) -> EncoderModel:
    return nnx.merge(model_graph(cfg)[0], params)


# Parameter path -> checkpoint name; `layers.` paths are relative to `encoder.layer.{i}.`.
HF_NAMES = {
    "embed.word.weight": "embeddings.word_embeddings.weight",
    "embed.position.weight": "embeddings.position_embeddings.weight",
    "embed.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embed.norm.weight": "embeddings.LayerNorm.weight",
    "embed.norm.bias": "embeddings.LayerNorm.bias",
    **{
        f"layers.attn.{p}_proj.{kind}": f"attention.self.{hf}.{kind}"
        for p, hf in (("q", "query"), ("k", "key"), ("v", "value"))
        for kind in ("weight", "bias")
    },
    "layers.attn.out_proj.weight": "attention.output.dense.weight",
    "layers.attn.out_proj.bias": "attention.output.dense.bias",
    "layers.attn_norm.weight": "attention.output.LayerNorm.weight",
    "layers.attn_norm.bias": "attention.output.LayerNorm.bias",
    "layers.up_proj.weight": "intermediate.dense.weight",
    "layers.up_proj.bias": "intermediate.dense.bias",
    "layers.down_proj.weight": "output.dense.weight",
    "layers.down_proj.bias": "output.dense.bias",
    "layers.mlp_norm.weight": "output.LayerNorm.weight",
    "layers.mlp_norm.bias": "output.LayerNorm.bias",
}
LAYER_PREFIX = "encoder.layer.{i}."


def hf_weight_names(cfg: EncoderConfig, prefix: str = "") -> list[str]:
    """Every checkpoint tensor the encoder reads (`prefix`: "bert." in a BertForMaskedLM checkpoint)."""
    top = [prefix + name for path, name in HF_NAMES.items() if not path.startswith("layers.")]
    per_layer = [name for path, name in HF_NAMES.items() if path.startswith("layers.")]
    layers = [
        f"{prefix}{LAYER_PREFIX.format(i=i)}{name}" for i in range(cfg.num_layers) for name in per_layer
    ]
    return top + layers
