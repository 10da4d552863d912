"""The FLUX transformer (`FluxTransformer2DModel`) as a `flax.nnx` module: double-stream blocks (text and
image tokens with their own weights, attending jointly), then single-stream blocks over the
concatenation, conditioned on the timestep, the pooled CLIP embedding and, for FLUX.1-dev, the guidance
scale through adaptive LayerNorm (shift, scale, gate). Positions are 3-axis RoPE over (0, row, column)
ids of the 2x2-patchified latents.

Each kind of block is stacked and run under `lax.scan`: compiling 19 + 38 blocks unrolled takes minutes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.models.dense_attention import attend
from jaxrs.models.layers import layer_norm
from jaxrs.models.nn import Linear, RMSNorm
from jaxrs.ops import Kernels

TIME_CHANNELS = 256  # sinusoidal features of the timestep and guidance embeddings
ROPE_THETA = 10000.0
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> FluxConfig:
        if raw.get("patch_size", 1) != 1 or raw.get("out_channels") not in (None, raw.get("in_channels", 64)):
            raise ValueError("only FLUX transformers with patch_size 1 and out_channels = in_channels")
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in raw.items() if k in known}
        if "axes_dims_rope" in kept:
            kept["axes_dims_rope"] = tuple(kept["axes_dims_rope"])
        return cls(**kept)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Adaptive LayerNorm: LayerNorm without weights (eps 1e-6), then the conditioning's scale and shift."""
    normed = layer_norm(x, jnp.ones(x.shape[-1], jnp.float32), None, EPS)
    return normed * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t: jax.Array) -> jax.Array:
    """`[B]` -> `[B, 256]` sinusoidal features, cosines first (diffusers' `flip_sin_to_cos`)."""
    half = TIME_CHANNELS // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[S, head_dim]` for position ids `[S, axes]` (computed in f64 on the host, each frequency
    repeated for its pair of features: FLUX rotates interleaved pairs)."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(ids[:, axis].astype(np.float64), freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=-1))
        sin.append(np.repeat(np.sin(angles), 2, axis=-1))
    return np.concatenate(cos, -1).astype(np.float32), np.concatenate(sin, -1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved feature pairs of `[B, S, H, D]` by position (in f32)."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


class Mlp(nnx.Module):
    """`linear_2(silu(linear_1(x)))`: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_features: int, dim: int):
        self.linear_1 = Linear(in_features, dim, bias=True)
        self.linear_2 = Linear(dim, dim, bias=True)

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x, kernels)), kernels)


class Qkv(nnx.Module):
    """One stream's query, key and value projections with per-head RMSNorm on queries and keys."""

    def __init__(self, cfg: FluxConfig):
        self.to_q = Linear(cfg.dim, cfg.dim, bias=True)
        self.to_k = Linear(cfg.dim, cfg.dim, bias=True)
        self.to_v = Linear(cfg.dim, cfg.dim, bias=True)
        self.norm_q = RMSNorm(cfg.attention_head_dim, eps=EPS)
        self.norm_k = RMSNorm(cfg.attention_head_dim, eps=EPS)
        self.heads = cfg.num_attention_heads

    def __call__(self, x: jax.Array, kernels: Kernels) -> tuple[jax.Array, jax.Array, jax.Array]:
        def heads(proj: Linear) -> jax.Array:
            return proj(x, kernels).reshape(*x.shape[:2], self.heads, -1)

        return self.norm_q(heads(self.to_q)), self.norm_k(heads(self.to_k)), heads(self.to_v)


def joint_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Attention over `[B, S, H, D]` text+image tokens with RoPE; `[B, S, H * D]`."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attend(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)), scale=q.shape[-1] ** -0.5)
    return out.transpose(0, 2, 1, 3).reshape(*q.shape[:2], -1)


class FeedForward(nnx.Module):
    def __init__(self, dim: int):
        self.up = Linear(dim, 4 * dim, bias=True)
        self.down = Linear(4 * dim, dim, bias=True)

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x, kernels), approximate=True), kernels)


class DoubleBlock(nnx.Module):
    """Image and text streams, each with its own modulation, projections and MLP, attending jointly."""

    def __init__(self, cfg: FluxConfig):
        dim = cfg.dim
        self.norm1 = Linear(dim, 6 * dim, bias=True)
        self.norm1_context = Linear(dim, 6 * dim, bias=True)
        self.attn = Qkv(cfg)
        self.attn_context = Qkv(cfg)
        self.to_out = Linear(dim, dim, bias=True)
        self.to_add_out = Linear(dim, dim, bias=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def __call__(self, img, txt, temb, cos, sin, kernels: Kernels):
        silu = jax.nn.silu(temb)
        mod = jnp.split(self.norm1(silu, kernels), 6, axis=-1)
        cmod = jnp.split(self.norm1_context(silu, kernels), 6, axis=-1)
        qi, ki, vi = self.attn(modulate(img, mod[0], mod[1]), kernels)
        qt, kt, vt = self.attn_context(modulate(txt, cmod[0], cmod[1]), kernels)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        out = joint_attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), cos, sin)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = img + mod[2][:, None] * self.to_out(img_out, kernels)
        img = img + mod[5][:, None] * self.ff(modulate(img, mod[3], mod[4]), kernels)
        txt = txt + cmod[2][:, None] * self.to_add_out(txt_out, kernels)
        txt = txt + cmod[5][:, None] * self.ff_context(modulate(txt, cmod[3], cmod[4]), kernels)
        return img, txt


class SingleBlock(nnx.Module):
    """One stream over text+image tokens: attention and an MLP in parallel, one output projection."""

    def __init__(self, cfg: FluxConfig):
        dim = cfg.dim
        self.norm = Linear(dim, 3 * dim, bias=True)
        self.attn = Qkv(cfg)
        self.proj_mlp = Linear(dim, 4 * dim, bias=True)
        self.proj_out = Linear(5 * dim, dim, bias=True)

    def __call__(self, h, temb, cos, sin, kernels: Kernels):
        shift, scale, gate = jnp.split(self.norm(jax.nn.silu(temb), kernels), 3, axis=-1)
        x = modulate(h, shift, scale)
        attn = joint_attention(*self.attn(x, kernels), cos, sin)
        mlp = jax.nn.gelu(self.proj_mlp(x, kernels), approximate=True)
        return h + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1), kernels)


def _stack(make, n: int):
    return nnx.vmap(lambda _: make(), in_axes=0, out_axes=0)(jnp.arange(n))


def _scan(layers: nnx.Module, carry, step):
    graph, stacked = nnx.split(layers)

    def body(carry, state):
        return step(nnx.merge(graph, state), carry), None

    return jax.lax.scan(body, carry, stacked)[0]


class FluxTransformer(nnx.Module):
    """Packed latents `[B, S_img, in_channels]` -> predicted velocity of the same shape."""

    def __init__(self, cfg: FluxConfig):
        dim = cfg.dim
        self.x_embedder = Linear(cfg.in_channels, dim, bias=True)
        self.context_embedder = Linear(cfg.joint_attention_dim, dim, bias=True)
        self.timestep_embedder = Mlp(TIME_CHANNELS, dim)
        self.guidance_embedder = Mlp(TIME_CHANNELS, dim) if cfg.guidance_embeds else None
        self.text_embedder = Mlp(cfg.pooled_projection_dim, dim)
        self.transformer_blocks = _stack(lambda: DoubleBlock(cfg), cfg.num_layers)
        self.single_transformer_blocks = _stack(lambda: SingleBlock(cfg), cfg.num_single_layers)
        self.norm_out = Linear(dim, 2 * dim, bias=True)
        self.proj_out = Linear(dim, cfg.in_channels, bias=True)

    def __call__(
        self,
        latents: jax.Array,
        txt: jax.Array,
        pooled: jax.Array,
        timestep: jax.Array,
        guidance: jax.Array | None,
        cos: jax.Array,
        sin: jax.Array,
        kernels: Kernels = Kernels(),
    ) -> jax.Array:
        """`timestep` and `guidance` `[B]` as the pipeline passes them (sigma; the guidance scale), both
        scaled by 1000 here as diffusers does; `cos`/`sin` from `rope_tables` over text then image ids."""
        dtype = latents.dtype
        temb = self.timestep_embedder(timestep_features(timestep.astype(dtype) * 1000).astype(dtype), kernels)
        if self.guidance_embedder is not None:
            g = timestep_features(guidance.astype(dtype) * 1000).astype(dtype)
            temb = temb + self.guidance_embedder(g, kernels)
        temb = temb + self.text_embedder(pooled.astype(dtype), kernels)
        img = self.x_embedder(latents, kernels)
        txt = self.context_embedder(txt.astype(dtype), kernels)

        img, txt = _scan(
            self.transformer_blocks, (img, txt), lambda block, c: block(*c, temb, cos, sin, kernels)
        )
        h = jnp.concatenate([txt, img], axis=1)
        h = _scan(self.single_transformer_blocks, h, lambda block, h: block(h, temb, cos, sin, kernels))
        scale, shift = jnp.split(self.norm_out(jax.nn.silu(temb), kernels), 2, axis=-1)
        return self.proj_out(modulate(h[:, txt.shape[1] :], shift, scale), kernels)


def _pair(names: dict[str, str]) -> dict[str, str]:
    return {f"{p}.{kind}": f"{hf}.{kind}" for p, hf in names.items() for kind in ("weight", "bias")}


# Parameter path -> diffusers checkpoint name (`*.` paths relative to the block's `{i}.`).
FLUX_NAMES = {
    **_pair(
        {
            "timestep_embedder.linear_1": "time_text_embed.timestep_embedder.linear_1",
            "timestep_embedder.linear_2": "time_text_embed.timestep_embedder.linear_2",
            "guidance_embedder.linear_1": "time_text_embed.guidance_embedder.linear_1",
            "guidance_embedder.linear_2": "time_text_embed.guidance_embedder.linear_2",
            "text_embedder.linear_1": "time_text_embed.text_embedder.linear_1",
            "text_embedder.linear_2": "time_text_embed.text_embedder.linear_2",
            "norm_out": "norm_out.linear",
            "transformer_blocks.*.norm1": "norm1.linear",
            "transformer_blocks.*.norm1_context": "norm1_context.linear",
            "transformer_blocks.*.attn_context.to_q": "attn.add_q_proj",
            "transformer_blocks.*.attn_context.to_k": "attn.add_k_proj",
            "transformer_blocks.*.attn_context.to_v": "attn.add_v_proj",
            "transformer_blocks.*.to_out": "attn.to_out.0",
            "transformer_blocks.*.to_add_out": "attn.to_add_out",
            "transformer_blocks.*.ff.up": "ff.net.0.proj",
            "transformer_blocks.*.ff.down": "ff.net.2",
            "transformer_blocks.*.ff_context.up": "ff_context.net.0.proj",
            "transformer_blocks.*.ff_context.down": "ff_context.net.2",
            "single_transformer_blocks.*.norm": "norm.linear",
        }
    ),
    "transformer_blocks.*.attn_context.norm_q.weight": "attn.norm_added_q.weight",
    "transformer_blocks.*.attn_context.norm_k.weight": "attn.norm_added_k.weight",
}
FLUX_STACKS = {
    "transformer_blocks": "transformer_blocks.{i}.",
    "single_transformer_blocks": "single_transformer_blocks.{i}.",
}


def is_block_matrix(path: str) -> bool:
    """The matrices ISQ packs: every linear weight inside the blocks (the embedders and output layer,
    a small share of the weights, stay float)."""
    return (
        path.endswith(".weight") and "_blocks." in path and ".norm_q." not in path and ".norm_k." not in path
    )
