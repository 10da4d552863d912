"""The FLUX text-to-image pipeline: prompt embeddings -> Euler sampling over packed latents -> VAE decode.

Every stage is one jitted function per shape: the text encoders per prompt batch, one denoising step
(transformer plus Euler update) per (batch, image size), the decoder per (batch, image size). The step
loop runs on the host so each step can be reported (`on_step`), and a request can be abandoned between
steps. The same seed gives the same noise, hence the same image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.images.flow_match import SchedulerConfig, euler_step, sigmas
from jaxrs.images.flux_transformer import FluxConfig, rope_tables
from jaxrs.images.vae_decoder import VaeConfig
from jaxrs.ops import Kernels


@dataclasses.dataclass(frozen=True)
class Component:
    """A module used functionally: its graph (static) and its filled state."""

    graph: nnx.GraphDef
    params: dict

    def module(self) -> nnx.Module:
        return nnx.merge(self.graph, self.params)


def pack(latents: jax.Array) -> jax.Array:
    """`[B, C, h, w]` -> `[B, h/2 * w/2, 4C]`: each 2x2 patch one token (channel, row, column order)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """The inverse of `pack` for latents of `h x w`."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def position_ids(text_len: int, h: int, w: int) -> np.ndarray:
    """`[text_len + h/2 * w/2, 3]`: zeros for text tokens, (0, row, column) for image patches."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    img = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return np.concatenate([np.zeros((text_len, 3), img.dtype), img]).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graph", "kernels"))
def _encode_text(graph, params, tokens, kernels):
    return nnx.merge(graph, params)(tokens, kernels)


@functools.partial(jax.jit, static_argnames=("graph", "kernels"), donate_argnames=("latents",))
def _denoise_step(graph, params, latents, txt, pooled, sigma, sigma_next, guidance, cos, sin, kernels):
    model = nnx.merge(graph, params)
    t = jnp.broadcast_to(sigma, latents.shape[:1])
    velocity = model(latents, txt, pooled, t, guidance, cos, sin, kernels)
    return euler_step(latents, velocity, sigma, sigma_next)


@functools.partial(jax.jit, static_argnames=("graph", "h", "w", "kernels"))
def _decode(graph, params, tokens, h, w, kernels):
    image = nnx.merge(graph, params)(unpack(tokens, h, w), kernels).astype(jnp.float32)
    return jnp.round(jnp.clip(image / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


@dataclasses.dataclass
class FluxPipeline:
    """The loaded components (see `jaxrs.images.loading`) and how to run them."""

    transformer_config: FluxConfig
    transformer: Component
    vae_config: VaeConfig
    vae: Component
    clip: Component
    t5: Component
    scheduler: SchedulerConfig
    dtype: jnp.dtype = jnp.float32
    kernels: Kernels = Kernels()

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4

    @property
    def guided(self) -> bool:
        """FLUX.1-dev style: the guidance scale is an input of the transformer."""
        return self.transformer_config.guidance_embeds

    def encode(self, clip_tokens: np.ndarray, t5_tokens: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Token ids `[B, 77]` and `[B, L]` -> (T5 embeddings `[B, L, 4096]`, pooled CLIP `[B, 768]`)."""
        _, pooled = _encode_text(self.clip.graph, self.clip.params, jnp.asarray(clip_tokens), self.kernels)
        txt = _encode_text(self.t5.graph, self.t5.params, jnp.asarray(t5_tokens), self.kernels)
        return txt, pooled

    def noise(self, seed: int, n: int, height: int, width: int) -> jax.Array:
        """The initial latents `[n, C, height/8, width/8]` for `seed` (f32 standard normal)."""
        scale = self.vae_config.scale
        shape = (n, self.latent_channels, height // scale, width // scale)
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32)

    def denoise(
        self,
        latents: jax.Array,
        txt: jax.Array,
        pooled: jax.Array,
        num_steps: int,
        guidance_scale: float,
        on_step: Callable[[int, int], None] | None = None,
    ) -> jax.Array:
        """Sample from initial latents `[B, C, h, w]`; returns the packed final latents."""
        h, w = latents.shape[2:]
        tokens = pack(latents.astype(self.dtype))
        cos, sin = map(
            jnp.asarray, rope_tables(position_ids(txt.shape[1], h, w), self.transformer_config.axes_dims_rope)
        )
        levels = sigmas(num_steps, tokens.shape[1], self.scheduler)
        guidance = jnp.full(tokens.shape[:1], guidance_scale, jnp.float32) if self.guided else None
        txt, pooled = txt.astype(self.dtype), pooled.astype(self.dtype)
        for i in range(num_steps):
            tokens = _denoise_step(
                self.transformer.graph,
                self.transformer.params,
                tokens,
                txt,
                pooled,
                jnp.float32(levels[i]),
                jnp.float32(levels[i + 1]),
                guidance,
                cos,
                sin,
                self.kernels,
            )
            if on_step is not None:
                tokens.block_until_ready()
                on_step(i + 1, num_steps)
        return tokens

    def decode(self, tokens: jax.Array, h: int, w: int) -> np.ndarray:
        """Packed latents of `h x w` -> uint8 images `[B, 8h, 8w, 3]`."""
        return np.asarray(_decode(self.vae.graph, self.vae.params, tokens, h, w, self.kernels))
