"""T5's encoder (`T5EncoderModel`, v1.0 ReLU or v1.1 gated-GELU feed-forward) as a `flax.nnx` module:
FLUX's per-token text conditioning.

RMSNorm before each sub-layer, unscaled attention plus a learned relative-position bias (bucketed on the
host: the sequence length is static), layers stacked and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.config import ACTIVATIONS
from jaxrs.models.dense_attention import attend
from jaxrs.models.layers import activation
from jaxrs.models.nn import Embedding, Linear, RMSNorm, value
from jaxrs.ops import Kernels


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    gated: bool
    act: str  # "relu" | "gelu_tanh" | "gelu"

    @classmethod
    def from_dict(cls, raw: dict) -> T5Config:
        proj = raw.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = raw.get("dense_act_fn") or proj.removeprefix("gated-")
        return cls(
            vocab_size=raw["vocab_size"],
            d_model=raw["d_model"],
            d_kv=raw["d_kv"],
            d_ff=raw["d_ff"],
            num_layers=raw["num_layers"],
            num_heads=raw["num_heads"],
            num_buckets=raw.get("relative_attention_num_buckets", 32),
            max_distance=raw.get("relative_attention_max_distance", 128),
            eps=float(raw.get("layer_norm_epsilon", 1e-6)),
            gated=gated,
            act=ACTIVATIONS.get(act, act),
        )


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """`[T, T]` bucket of each (query, key) offset, bidirectional (T5's encoder rule, in f32 as there)."""
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (offset > 0).astype(np.int64) * half
    distance = np.abs(offset)
    max_exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.log(distance.astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
        large = max_exact + np.nan_to_num(scaled * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Layer(nnx.Module):
    def __init__(self, cfg: T5Config):
        inner = cfg.num_heads * cfg.d_kv
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.eps)
        self.q = Linear(cfg.d_model, inner)
        self.k = Linear(cfg.d_model, inner)
        self.v = Linear(cfg.d_model, inner)
        self.o = Linear(inner, cfg.d_model)
        self.ff_norm = RMSNorm(cfg.d_model, eps=cfg.eps)
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff) if cfg.gated else None
        self.wo = Linear(cfg.d_ff, cfg.d_model)
        self.heads, self.act = cfg.num_heads, cfg.act

    def __call__(self, h: jax.Array, bias: jax.Array, kernels: Kernels) -> jax.Array:
        batch, length, _ = h.shape
        x = self.attn_norm(h)

        def heads(proj: Linear) -> jax.Array:
            return proj(x, kernels).reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

        out = attend(heads(self.q), heads(self.k), heads(self.v), scale=1.0, bias=bias)
        h = h + self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1), kernels)
        x = self.ff_norm(h)
        up = (
            activation(self.wi_0(x, kernels), self.act)
            if self.act != "relu"
            else jax.nn.relu(self.wi_0(x, kernels))
        )
        if self.wi_1 is not None:
            up = up * self.wi_1(x, kernels)
        return h + self.wo(up, kernels)


class T5Encoder(nnx.Module):
    """Tokens `[B, T]` -> last hidden states `[B, T, d_model]` (every token attends to every token, as
    FLUX runs it: its prompts are padded to a fixed length without a mask)."""

    def __init__(self, cfg: T5Config):
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.relative_attention_bias = Embedding(cfg.num_buckets, cfg.num_heads)
        self.layers = nnx.vmap(lambda _: T5Layer(cfg), in_axes=0, out_axes=0)(jnp.arange(cfg.num_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.eps)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance

    def __call__(self, tokens: jax.Array, kernels: Kernels = Kernels()) -> jax.Array:
        dtype = value(self.final_layer_norm.weight).dtype
        buckets = relative_buckets(tokens.shape[1], self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(jnp.asarray(buckets), jnp.float32).transpose(2, 0, 1)[None]
        graph, stacked = nnx.split(self.layers)

        def body(h: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graph, state)(h, bias, kernels), None

        h, _ = jax.lax.scan(body, self.shared(tokens, dtype), stacked)
        return self.final_layer_norm(h)


def t5_names(cfg: T5Config) -> dict[str, str]:
    """Parameter path -> checkpoint name (`layers.*` paths relative to `encoder.block.{i}.`); v1.0's
    single up-projection is `wi`, read into `wi_0`."""
    ff = {"wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"} if cfg.gated else {"wi_0": "wi", "wo": "wo"}
    return {
        **T5_NAMES,
        **{f"layers.*.{p}.weight": f"layer.1.DenseReluDense.{hf}.weight" for p, hf in ff.items()},
    }


T5_NAMES = {
    "shared.weight": "shared.weight",
    "relative_attention_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "final_layer_norm.weight": "encoder.final_layer_norm.weight",
    "layers.*.attn_norm.weight": "layer.0.layer_norm.weight",
    **{f"layers.*.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
    "layers.*.ff_norm.weight": "layer.1.layer_norm.weight",
}
T5_STACKS = {"layers": "encoder.block.{i}."}
