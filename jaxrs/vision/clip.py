"""CLIP's vision transformer (the tower of LLaVA 1.5, LLaVA-NeXT and Phi-3 Vision) as `flax.nnx`
modules: patch embedding (a strided convolution as one matmul), class token, learned positions,
pre-norm, then pre-norm encoder layers (`models.prenorm_encoder`) with QuickGELU MLPs. Parameter
paths mirror transformers' names (`embeddings.patch_embedding.weight`,
`encoder.layers.3.self_attn.q_proj.weight`), so loading is a lookup. Only the layers up to the feature
layer are built: LLaVA reads the second-to-last hidden state, so the last layer's weights are never
loaded nor run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.errors import JaxrsError
from jaxrs.models.nn import LayerNorm, _param, value
from jaxrs.models.prenorm_encoder import PreNormLayer


def vit_shape(raw: Mapping) -> dict:
    """The ViT shape fields of a transformers `vision_config`, with the defaults CLIP's and SigLIP's
    configs share."""
    return dict(
        hidden_size=raw.get("hidden_size", 768),
        intermediate_size=raw.get("intermediate_size", 3072),
        num_layers=raw.get("num_hidden_layers", 12),
        num_heads=raw.get("num_attention_heads", 12),
        image_size=raw.get("image_size", 224),
        patch_size=raw.get("patch_size", 32),
    )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT tower's shape (transformers' `vision_config`) and which hidden states the model reads."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    feature_layers: tuple[int, ...] = (-2,)  # hidden-state indices (0: the embeddings), concatenated
    drop_cls: bool = True  # `vision_feature_select_strategy == "default"`: the class token's row goes

    @classmethod
    def from_hf(
        cls, raw: Mapping, feature_layer: int | list[int] = -2, strategy: str = "default"
    ) -> VisionConfig:
        layers = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
        if strategy not in ("default", "full"):
            raise JaxrsError(f"unsupported vision_feature_select_strategy {strategy!r} (default, full)")
        return cls(
            **vit_shape(raw),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-5),
            hidden_act=raw.get("hidden_act", "quick_gelu"),
            num_channels=raw.get("num_channels", 3),
            feature_layers=layers,
            drop_cls=strategy == "default",
        )

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The feature layers as hidden-state indices 0..num_layers."""
        return tuple(i % (self.num_layers + 1) for i in self.feature_layers)

    @property
    def layers_run(self) -> int:
        return max(self.layer_indices)

    @property
    def feature_size(self) -> int:
        """Width of a feature row: the hidden size times the number of feature layers."""
        return self.hidden_size * len(self.feature_layers)


class Weight(nnx.Module):
    """A lone `weight` parameter (a module of its own so its path reads like the checkpoint's)."""

    def __init__(self, *shape: int):
        self.weight = _param(*shape)


class Embeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = Weight(d, cfg.num_channels, p, p)
        self.class_embedding = _param(d)
        self.position_embedding = Weight(cfg.grid**2 + 1, d)
        self.patch = p

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`[B, C, H, W]` -> `[B, 1 + patches, D]`: class token, then patches row by row."""
        b, c, h, w = pixels.shape
        p = self.patch
        patches = pixels.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (h // p) * (w // p), c * p * p)
        weight = value(self.patch_embedding.weight)
        x = patches @ weight.reshape(weight.shape[0], -1).T.astype(patches.dtype)
        cls = jnp.broadcast_to(value(self.class_embedding).astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + value(self.position_embedding.weight).astype(x.dtype)[None, : x.shape[1]]


class Encoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        self.layers = nnx.List([PreNormLayer(cfg) for _ in range(num_layers)])


class CLIPVision(nnx.Module):
    """Pixels `[tiles, C, H, W]` -> the selected hidden states `[tiles, rows, feature_size]` (the class
    token's row dropped when the strategy says so; several feature layers concatenated)."""

    def __init__(self, cfg: VisionConfig):
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # transformers' spelling
        self.encoder = Encoder(cfg, cfg.layers_run)
        self.cfg = cfg

    def __call__(self, pixels: jax.Array) -> jax.Array:
        h = self.pre_layrnorm(self.embeddings(pixels))
        hidden = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            hidden.append(h)
        picked = [hidden[i] for i in self.cfg.layer_indices]
        if self.cfg.drop_cls:
            picked = [x[:, 1:] for x in picked]
        return jnp.concatenate(picked, axis=-1)
