"""SigLIP vision encoder as Idefics 2 runs it: images of any size up to the training resolution, padded
into a batch, with a patch mask and NaViT-style ("Patch n' Pack") position ids.

Each tile is cut into `patch_size` squares (the patch convolution, as a matmul over flattened patches);
a patch counts when every one of its pixels is real (the pixel mask), and padding patches are masked out
of attention as keys. A real patch at row r of an image `rows` patches high gets position row
`bucket(r / rows)` of the `image_size / patch_size` grid (and likewise for columns), with the float32
arithmetic of transformers' `Idefics2VisionEmbeddings`, so every size lands on the same ids. Then
pre-LN encoder layers (`models.prenorm_encoder`, tanh-GELU MLP) and a final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.models.nn import Embedding, LayerNorm, Linear, value
from jaxrs.models.prenorm_encoder import PreNormLayer
from jaxrs.ops import Kernels
from jaxrs.vision.clip import vit_shape

NEG_INF = -1e30  # finite, so a row with no real key stays finite
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


def hf_activation(name: str) -> str:
    """transformers' activation name -> the one `models.layers.activation` takes."""
    try:
        return HF_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (known: {', '.join(HF_ACTIVATIONS)})") from None


@dataclass(frozen=True)
class SiglipConfig:
    """The vision_config of an Idefics 2 config.json."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, raw: dict) -> SiglipConfig:
        return cls(
            **vit_shape(raw),
            hidden_act=hf_activation(raw.get("hidden_act", "gelu_pytorch_tanh")),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def patch_mask(pixel_mask: jax.Array, patch: int) -> jax.Array:
    """`[B, H, W]` pixel mask -> `[B, H // patch, W // patch]`: a patch counts when all its pixels do."""
    b, h, w = pixel_mask.shape
    rows, cols = h // patch, w // patch
    cells = pixel_mask[:, : rows * patch, : cols * patch].reshape(b, rows, patch, cols, patch)
    return jnp.all(cells.astype(bool), axis=(2, 4))


def _bucket_boundaries(per_side: int) -> np.ndarray:
    """`torch.arange(1 / n, 1.0, 1 / n)` in float32: its length and values as torch computes them."""
    step = 1.0 / per_side
    count = int(np.ceil((1.0 - step) / step))
    return (step + np.arange(count, dtype=np.float64) * step).astype(np.float32)


def _fractional_buckets(real: jax.Array, length: int, boundaries: np.ndarray) -> jax.Array:
    """`[B, length]` bucket of each index along one side, for `real` patches along it (`[B]`)."""
    step = jnp.float32(1.0) / real.astype(jnp.float32)
    coords = jnp.arange(length, dtype=jnp.float32)[None, :] * step[:, None]
    coords = jnp.minimum(coords, jnp.float32(1.0 - 1e-6))
    return jnp.searchsorted(jnp.asarray(boundaries), coords, side="right", method="compare_all").astype(
        jnp.int32
    )


def position_ids(mask: jax.Array, per_side: int) -> jax.Array:
    """`[B, rows * cols]` position ids of a `[B, rows, cols]` patch mask (0 at padding patches)."""
    b, rows, cols = mask.shape
    boundaries = _bucket_boundaries(per_side)
    rows_h = _fractional_buckets(mask[:, :, 0].sum(axis=1), rows, boundaries)
    cols_w = _fractional_buckets(mask[:, 0, :].sum(axis=1), cols, boundaries)
    ids = (rows_h[:, :, None] * per_side + cols_w[:, None, :]).reshape(b, -1)
    return jnp.where(mask.reshape(b, -1), ids, 0)


class SiglipEmbeddings(nnx.Module):
    """Patch embedding (a `[hidden, 3 * p * p]` matrix: the convolution flattened) plus position rows."""

    def __init__(self, cfg: SiglipConfig):
        self.patch_embedding = Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=True)
        self.position_embedding = Embedding(cfg.patches_per_side**2, cfg.hidden_size)
        self.cfg = cfg

    def __call__(self, pixels: jax.Array, mask: jax.Array, kernels: Kernels) -> jax.Array:
        b, c, h, w = pixels.shape
        p = self.cfg.patch_size
        rows, cols = h // p, w // p
        patches = pixels[:, :, : rows * p, : cols * p].reshape(b, c, rows, p, cols, p)
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)
        emb = self.patch_embedding(patches, kernels)
        return emb + self.position_embedding(position_ids(mask, self.cfg.patches_per_side), emb.dtype)


class SiglipEncoder(nnx.Module):
    """Embeddings, the stacked layers (run under `lax.scan`), the final LayerNorm."""

    def __init__(self, cfg: SiglipConfig):
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nnx.vmap(lambda _: PreNormLayer(cfg), in_axes=0, out_axes=0)(jnp.arange(cfg.num_layers))
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.cfg = cfg

    def __call__(self, pixels: jax.Array, mask: jax.Array, kernels: Kernels = Kernels()) -> jax.Array:
        """`[B, rows * cols, hidden]` for pixels `[B, 3, H, W]` and a patch mask `[B, rows, cols]`."""
        h = self.embeddings(pixels.astype(value(self.post_layernorm.weight).dtype), mask, kernels)
        key_bias = jnp.where(mask.reshape(mask.shape[0], -1), 0.0, NEG_INF).astype(jnp.float32)
        bias = key_bias[:, None, None, :]  # padding patches are no one's keys
        graph, stacked = nnx.split(self.layers)

        def body(h: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graph, state)(h, bias, kernels), None

        h, _ = jax.lax.scan(body, h, stacked)
        return self.post_layernorm(h)


def siglip_checkpoint_name(path: str, prefix: str) -> str:
    """A `SiglipEncoder` parameter path -> its name in transformers' SigLIP / Idefics 2 vision model."""
    if path.startswith("layers."):
        return f"{prefix}encoder.layers.{{i}}.{path.removeprefix('layers.')}"
    return prefix + path
