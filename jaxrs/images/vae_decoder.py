"""The decoder half of the VAE (`AutoencoderKL.decode`) as a `flax.nnx` module: latents -> RGB in
[-1, 1]. Convolutions run channels-last (NHWC) with the checkpoint's `[out, in, kh, kw]` kernels;
GroupNorm in f32; the mid-block attention is single-head over all pixels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.models.dense_attention import attend
from jaxrs.models.nn import Linear, value
from jaxrs.ops import Kernels

EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def scale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict) -> VaeConfig:
        return cls(
            latent_channels=raw.get("latent_channels", 4),
            out_channels=raw.get("out_channels", 3),
            block_out_channels=tuple(raw.get("block_out_channels", (64,))),
            layers_per_block=raw.get("layers_per_block", 1),
            norm_num_groups=raw.get("norm_num_groups", 32),
            use_post_quant_conv=raw.get("use_post_quant_conv", True),
            scaling_factor=float(raw.get("scaling_factor", 0.18215)),
            shift_factor=float(raw.get("shift_factor") or 0.0),
        )


class Conv(nnx.Module):
    """2-D convolution, stride 1, 'same' padding, over NHWC."""

    def __init__(self, in_channels: int, out_channels: int, size: int = 3):
        self.weight = nnx.Param(jnp.zeros((out_channels, in_channels, size, size), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = value(self.weight)
        pad = w.shape[-1] // 2
        y = jax.lax.conv_general_dilated(
            x, w.astype(x.dtype), (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "OIHW", "NHWC")
        )
        return y + value(self.bias).astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, groups: int, channels: int):
        self.weight = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + EPS)).reshape(b, h, w, c)
        return (xf * value(self.weight) + value(self.bias)).astype(x.dtype)


class Resnet(nnx.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int):
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv(out_channels, out_channels)
        self.conv_shortcut = Conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidAttention(nnx.Module):
    def __init__(self, groups: int, channels: int):
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels, bias=True)
        self.to_k = Linear(channels, channels, bias=True)
        self.to_v = Linear(channels, channels, bias=True)
        self.to_out = Linear(channels, channels, bias=True)

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        out = attend(self.to_q(t, kernels), self.to_k(t, kernels), self.to_v(t, kernels), scale=c**-0.5)
        return x + self.to_out(out, kernels).reshape(b, h, w, c)


class UpBlock(nnx.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int, layers: int, upsample: bool):
        channels = [in_channels] + [out_channels] * (layers - 1)
        self.resnets = nnx.List([Resnet(groups, c, out_channels) for c in channels])
        self.upsample = Conv(out_channels, out_channels) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return x


class VaeDecoder(nnx.Module):
    """Latents `[B, C, h, w]` (as the sampler leaves them, before the VAE's scaling) -> images
    `[B, H, W, 3]` in [-1, 1]."""

    def __init__(self, cfg: VaeConfig):
        groups, channels = cfg.norm_num_groups, cfg.block_out_channels[::-1]
        self.post_quant_conv = (
            Conv(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        )
        self.conv_in = Conv(cfg.latent_channels, channels[0])
        self.mid_resnet_0 = Resnet(groups, channels[0], channels[0])
        self.mid_attention = MidAttention(groups, channels[0])
        self.mid_resnet_1 = Resnet(groups, channels[0], channels[0])
        self.up_blocks = nnx.List(
            [
                UpBlock(groups, channels[max(i - 1, 0)], c, cfg.layers_per_block + 1, i < len(channels) - 1)
                for i, c in enumerate(channels)
            ]
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv(channels[-1], cfg.out_channels)
        self.scaling_factor, self.shift_factor = cfg.scaling_factor, cfg.shift_factor

    def __call__(self, latents: jax.Array, kernels: Kernels = Kernels()) -> jax.Array:
        dtype = value(self.conv_in.weight).dtype
        z = latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor
        x = z.astype(dtype).transpose(0, 2, 3, 1)
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        x = self.mid_resnet_1(self.mid_attention(self.mid_resnet_0(self.conv_in(x)), kernels))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


VAE_NAMES = {
    "mid_resnet_0": "decoder.mid_block.resnets.0",
    "mid_resnet_1": "decoder.mid_block.resnets.1",
    "mid_attention": "decoder.mid_block.attentions.0",
}


def vae_name(path: str) -> str:
    """Parameter path -> diffusers checkpoint name."""
    if path.startswith("post_quant_conv."):
        return path
    head, rest = path.split(".", 1)
    if head in VAE_NAMES:
        return f"{VAE_NAMES[head]}.{rest.replace('to_out.', 'to_out.0.')}"
    return "decoder." + path.replace(".upsample.", ".upsamplers.0.conv.")
