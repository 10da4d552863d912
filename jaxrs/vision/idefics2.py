"""Idefics 2: a SigLIP encoder, the connector (modality projection MLP, then a perceiver resampler that
compresses each tile to `resampler_n_latents` rows, 64 in the real model) and the processor.

The processor equals transformers' `Idefics2ImageProcessor` + `Idefics2Processor` for one image, made
upright and RGB first as its `load_image` makes it: with `do_image_splitting` the image is cut into 4
quarters (before resizing) followed by the whole image; each tile is resized so its longest edge is at
most `longest_edge` and both edges at least `shortest_edge` (Pillow, the configured resampling),
rescaled, normalized and zero-padded to the largest tile (its sides rounded up to a quarter of
`longest_edge`, so that few tower shapes compile), with a pixel mask of the real pixels. The
marker `<image>` becomes `<fake_token_around_image>` + `<image>` * image_seq_len per tile, tiles joined
by one fake token and closed by one, exactly the ids transformers' processor gives for the text
"<image>". Two things of the prompt around it are the processor's `assemble` (the family's prompt
assembly): transformers merges the fake tokens of adjacent images into one, and puts a space after an
image directly followed by a word. `FAMILY` wires it all to the engine.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jaxrs.config import ModelConfig, read_json
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.loading.model_config import config_from_hf
from jaxrs.models.dense_attention import attend
from jaxrs.models.layers import activation
from jaxrs.models.nn import Linear, RMSNorm, value
from jaxrs.ops import Kernels
from jaxrs.vision.image_input import ImageInput, content_hash
from jaxrs.vision.image_ops import RESAMPLING, rescale_normalize, upright_rgb
from jaxrs.vision.prompt import ImagePrompt, place_images
from jaxrs.vision.registry import VisionFamily
from jaxrs.vision.siglip import (
    NEG_INF,
    SiglipConfig,
    SiglipEncoder,
    hf_activation,
    patch_mask,
    siglip_checkpoint_name,
)
from jaxrs.vision.tower_weights import load_tower_params

IMAGE_TOKEN, FAKE_TOKEN = "<image>", "<fake_token_around_image>"
IMAGENET_STANDARD = (0.5, 0.5, 0.5)


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


# -- processor --------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, longest: int, shortest: int) -> tuple[int, int]:
    """transformers' Idefics 2 target size: cap the longest edge (keeping the ratio, truncating), then
    raise each edge to at least `shortest`."""
    ratio = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / ratio)
    elif height > width and height > longest:
        height, width = longest, int(longest * ratio)
    return max(height, shortest), max(width, shortest)


def split_quarters(image: Image.Image) -> list[Image.Image]:
    """The 4 quarters (top-left, top-right, bottom-left, bottom-right; odd pixels go right and down)
    and the whole image."""
    w, h = image.size
    mw, mh = w // 2, h // 2
    boxes = [(0, 0, mw, mh), (mw, 0, w, mh), (0, mh, mw, h), (mw, mh, w, h)]
    return [image.crop(box) for box in boxes] + [image]


@dataclass(frozen=True)
class Idefics2Processor:
    """One PIL image -> `ImageInput` (pixel values `[tiles, 3, H, W]`, extras `pixel_attention_mask`)."""

    image_token_id: int
    fake_token_id: int
    image_seq_len: int = 64
    do_image_splitting: bool = False
    do_resize: bool = True
    longest_edge: int = 980
    shortest_edge: int = 378
    resample: int = 2
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = IMAGENET_STANDARD
    image_std: tuple[float, ...] | None = IMAGENET_STANDARD
    marker: str = IMAGE_TOKEN

    @classmethod
    def from_folder(cls, path: str | Path, vocab: Mapping[str, int]) -> Idefics2Processor:
        """From `preprocessor_config.json` (or its copy inside `processor_config.json`); `vocab` maps
        token text -> id and must hold `<image>` and `<fake_token_around_image>`."""
        folder = Path(path)
        proc = _optional_json(folder / "processor_config.json")
        # transformers 5 nests the image processor's settings in processor_config.json
        pre = _optional_json(folder / "preprocessor_config.json") or proc.get("image_processor") or {}
        missing = [t for t in (IMAGE_TOKEN, FAKE_TOKEN) if t not in vocab]
        if missing:
            raise ModelLoadError(folder, f"the tokenizer has no {' or '.join(missing)} token")
        size = pre.get("size") or {}
        if "longest_edge" not in size or "shortest_edge" not in size:
            size = {"longest_edge": 980, "shortest_edge": 378} | size
        normalize = pre.get("do_normalize", True)
        return cls(
            image_token_id=vocab[IMAGE_TOKEN],
            fake_token_id=vocab[FAKE_TOKEN],
            image_seq_len=int(proc.get("image_seq_len", 64)),
            do_image_splitting=bool(pre.get("do_image_splitting", False)),
            do_resize=bool(pre.get("do_resize", True)),
            longest_edge=int(size["longest_edge"]),
            shortest_edge=int(size["shortest_edge"]),
            resample=int(pre.get("resample", 2)),
            rescale_factor=pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else None,
            image_mean=tuple(pre.get("image_mean", IMAGENET_STANDARD)) if normalize else None,
            image_std=tuple(pre.get("image_std", IMAGENET_STANDARD)) if normalize else None,
        )

    def tiles(self, image: Image.Image) -> list[np.ndarray]:
        """Each tile as float32 `[3, h, w]`, before padding."""
        if self.do_image_splitting and min(image.size) < 2:
            raise JaxrsError(f"an image of {image.width}x{image.height} pixels is too small to split in four")
        parts = split_quarters(image) if self.do_image_splitting else [image]
        out = []
        for tile in parts:
            if self.do_resize:
                h, w = resized_size(tile.height, tile.width, self.longest_edge, self.shortest_edge)
                if (h, w) != (tile.height, tile.width):
                    tile = tile.resize((w, h), resample=RESAMPLING[self.resample])
            chw = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1)
            out.append(rescale_normalize(chw, self.rescale_factor, self.image_mean, self.image_std))
        return out

    def prompt_tokens(self, num_tiles: int) -> tuple[int, ...]:
        """`fake (image * seq_len fake) * tiles`: adjacent fake tokens merged, as transformers merges them."""
        tile = (self.image_token_id,) * self.image_seq_len + (self.fake_token_id,)
        return (self.fake_token_id,) + tile * num_tiles

    def padded(self, side: int) -> int:
        """A tile side rounded up to the next quarter of `longest_edge`: images of many sizes share a
        few compiled tower shapes. The padding is masked out (as transformers' batch padding is), so the
        tower's rows do not change."""
        step = -(-self.longest_edge // 4)
        return -(-side // step) * step

    def assemble(
        self, tokenizer: Any, text: str, images: Sequence[ImageInput]
    ) -> tuple[list[int], ImagePrompt]:
        """The prompt ids transformers' processor gives for `text`: a space after an image directly
        followed by a word, BOS as its tokenizer adds it, and one boundary token between adjacent
        images (each image's tokens start with one; the next image's is dropped)."""
        text = re.sub(re.escape(self.marker) + r"(?=[^\s<])", self.marker + " ", text)
        ids = tokenizer.encode(text, add_special_tokens=True)
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        images = [
            dataclasses.replace(im, prompt_tokens=im.prompt_tokens[1:], feature_mask=im.feature_mask[1:])
            if 0 < k < len(at) and at[k] == at[k - 1] + 1
            else im
            for k, im in enumerate(images)
        ]
        return place_images(ids, [self.image_token_id], images)

    def __call__(self, image: Image.Image) -> ImageInput:
        rgb = upright_rgb(image)
        tiles = self.tiles(rgb)
        height, width = (self.padded(max(t.shape[k] for t in tiles)) for k in (1, 2))
        pixels = np.zeros((len(tiles), 3, height, width), np.float32)
        mask = np.zeros((len(tiles), height, width), bool)
        for i, tile in enumerate(tiles):
            pixels[i, :, : tile.shape[1], : tile.shape[2]] = tile
            mask[i, : tile.shape[1], : tile.shape[2]] = True
        tokens = self.prompt_tokens(len(tiles))
        return ImageInput(
            pixel_values=pixels,
            prompt_tokens=tokens,
            feature_mask=np.asarray(tokens) == self.image_token_id,
            content_hash=content_hash(rgb),
            extras={"pixel_attention_mask": mask},
        )


# -- tower ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerceiverConfig:
    hidden_size: int
    n_latents: int = 64
    depth: int = 3
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"


@dataclass(frozen=True)
class Idefics2Config:
    """The parts of an Idefics 2 config.json the tower needs."""

    vision: SiglipConfig
    perceiver: PerceiverConfig
    text_hidden_size: int
    text_intermediate_size: int
    text_act: str
    image_token_id: int

    @classmethod
    def from_hf(cls, raw: dict) -> Idefics2Config:
        text, per = raw.get("text_config") or {}, raw.get("perceiver_config") or {}
        hidden = text.get("hidden_size", 4096)
        # transformers replaces the perceiver's width and eps by the text model's when the widths differ
        same = per.get("hidden_size", 4096) == hidden
        eps = per.get("rms_norm_eps", 1e-6) if same else text.get("rms_norm_eps", 1e-5)
        return cls(
            vision=SiglipConfig.from_hf(raw.get("vision_config") or {}),
            perceiver=PerceiverConfig(
                hidden_size=hidden,
                n_latents=per.get("resampler_n_latents", 64),
                depth=per.get("resampler_depth", 3),
                num_heads=per.get("resampler_n_heads", 16),
                head_dim=per.get("resampler_head_dim", 96),
                num_kv_heads=per.get("num_key_value_heads", 4),
                rms_norm_eps=eps,
                hidden_act=hf_activation(per.get("hidden_act", "silu")),
            ),
            text_hidden_size=hidden,
            text_intermediate_size=text.get("intermediate_size", 14336),
            text_act=hf_activation(text.get("hidden_act", "silu")),
            image_token_id=raw.get("image_token_id", 32001),
        )


class GatedMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`, no biases (the modality projection and the perceiver's MLP)."""

    def __init__(self, dim: int, inner: int, out: int, act: str):
        self.gate_proj, self.up_proj = Linear(dim, inner), Linear(dim, inner)
        self.down_proj = Linear(inner, out)
        self.act = act

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        gate = activation(self.gate_proj(x, kernels), self.act)
        return self.down_proj(gate * self.up_proj(x, kernels), kernels)


class PerceiverAttention(nnx.Module):
    """Latents attend (GQA) over the context followed by the latents themselves."""

    def __init__(self, cfg: PerceiverConfig):
        d, heads, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = Linear(d, heads), Linear(d, kv), Linear(d, kv)
        self.o_proj = Linear(heads, d)
        self.cfg = cfg

    def __call__(self, latents: jax.Array, context: jax.Array, key_bias: jax.Array, kernels: Kernels):
        cfg = self.cfg
        both = jnp.concatenate([context, latents], axis=1)
        b, t, s = latents.shape[0], latents.shape[1], both.shape[1]
        q = self.q_proj(latents, kernels).reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(both, kernels).reshape(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(both, kernels).reshape(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)
        groups = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
        out = attend(q, k, v, scale=cfg.head_dim**-0.5, bias=key_bias[:, None, None, :])
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1), kernels)


class PerceiverLayer(nnx.Module):
    def __init__(self, cfg: PerceiverConfig):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_latents_norm, self.input_context_norm = RMSNorm(d, eps=eps), RMSNorm(d, eps=eps)
        self.self_attn = PerceiverAttention(cfg)
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        self.mlp = GatedMLP(d, 4 * d, d, cfg.hidden_act)

    def __call__(self, latents: jax.Array, context: jax.Array, key_bias: jax.Array, kernels: Kernels):
        context = self.input_context_norm(context)
        latents = latents + self.self_attn(self.input_latents_norm(latents), context, key_bias, kernels)
        return latents + self.mlp(self.post_attention_layernorm(latents), kernels)


class PerceiverResampler(nnx.Module):
    """`n_latents` learned rows refined by `depth` cross-attention layers over a tile's patch rows."""

    def __init__(self, cfg: PerceiverConfig):
        self.latents = nnx.Param(jnp.zeros((cfg.n_latents, cfg.hidden_size), jnp.float32))
        self.layers = nnx.vmap(lambda _: PerceiverLayer(cfg), in_axes=0, out_axes=0)(jnp.arange(cfg.depth))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, context: jax.Array, context_mask: jax.Array, kernels: Kernels) -> jax.Array:
        b = context.shape[0]
        latents = jnp.broadcast_to(value(self.latents).astype(context.dtype), (b, *self.latents.shape))
        keys = jnp.concatenate([context_mask, jnp.ones((b, latents.shape[1]), bool)], axis=1)
        key_bias = jnp.where(keys, 0.0, NEG_INF).astype(jnp.float32)
        graph, stacked = nnx.split(self.layers)

        def body(h: jax.Array, state) -> tuple[jax.Array, None]:
            return nnx.merge(graph, state)(h, context, key_bias, kernels), None

        latents, _ = jax.lax.scan(body, latents, stacked)
        return self.norm(latents)


class Idefics2Connector(nnx.Module):
    def __init__(self, cfg: Idefics2Config):
        self.modality_projection = GatedMLP(
            cfg.vision.hidden_size, cfg.text_intermediate_size, cfg.text_hidden_size, cfg.text_act
        )
        self.perceiver_resampler = PerceiverResampler(cfg.perceiver)


class Idefics2VisionTower(nnx.Module):
    """Pixels `[tiles, 3, H, W]` + pixel mask `[tiles, H, W]` -> `[tiles * n_latents, text_hidden]` rows,
    tile by tile, in the order of the prompt's `<image>` tokens."""

    def __init__(self, cfg: Idefics2Config):
        self.vision_model = SiglipEncoder(cfg.vision)
        self.connector = Idefics2Connector(cfg)
        self.cfg = cfg

    def __call__(
        self, pixel_values: jax.Array, *, pixel_attention_mask: jax.Array, kernels: Kernels = Kernels()
    ) -> jax.Array:
        mask = patch_mask(pixel_attention_mask, self.cfg.vision.patch_size)
        states = self.vision_model(pixel_values, mask, kernels)
        context = self.connector.modality_projection(states, kernels)
        flat = mask.reshape(mask.shape[0], -1)
        latents = self.connector.perceiver_resampler(context, flat, kernels)
        return latents.reshape(-1, latents.shape[-1])


def idefics2_checkpoint_name(path: str) -> str:
    """Tower parameter path -> transformers' Idefics2ForConditionalGeneration name."""
    if path.startswith("vision_model."):
        return siglip_checkpoint_name(path.removeprefix("vision_model."), "model.vision_model.")
    layers = "connector.perceiver_resampler.layers."
    if path.startswith(layers):
        return f"model.{layers}{{i}}.{path.removeprefix(layers)}"
    return "model." + path


# transformers' MistralConfig defaults with Idefics2Config's overrides: a text_config may list only
# what differs from them
MISTRAL_TEXT_DEFAULTS = {
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096 * 8,
    "rms_norm_eps": 1e-5,
}


def text_config(raw: Mapping) -> dict:
    """The text model's config.json dict (the Mistral family): `text_config` over Mistral's defaults."""
    text = raw.get("text_config") or {}
    return MISTRAL_TEXT_DEFAULTS | {k: v for k, v in text.items() if k != "architectures"}


def idefics2_text_config(folder: str | Path) -> ModelConfig:
    """The text model's config from an Idefics 2 folder's config.json."""
    file = Path(folder) / "config.json"
    return config_from_hf(text_config(read_json(file)), file)


def idefics2_text_tensor(name: str) -> str:
    """A text-model tensor name (`model.layers.0...`, `lm_head.weight`) -> its name in an Idefics 2
    checkpoint (`model.text_model.layers.0...`)."""
    return "model.text_model." + name.removeprefix("model.") if name.startswith("model.") else name


def load_idefics2_tower(folder: str | Path) -> tuple[Idefics2VisionTower, Idefics2Config]:
    """The tower with its weights (f32) from an Idefics 2 folder (config.json + safetensors)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    if raw.get("model_type") != "idefics2":
        raise ModelLoadError(folder / "config.json", f"model_type {raw.get('model_type')!r} is not idefics2")
    cfg = Idefics2Config.from_hf(raw)
    abstract = nnx.eval_shape(lambda: Idefics2VisionTower(cfg))
    params = load_tower_params(folder, abstract, idefics2_checkpoint_name)
    graph, _ = nnx.split(abstract)
    return nnx.merge(graph, params), cfg


def processor(folder: Path, raw: Mapping, tokenizer: Any) -> Idefics2Processor:
    """The folder's processor, its token ids from the tokenizer; its tokens per tile must be the
    resampler's latents (each `<image>` token takes one row)."""
    vocab = {t: tokenizer.token_to_id(t) for t in (IMAGE_TOKEN, FAKE_TOKEN)}
    found = Idefics2Processor.from_folder(folder, {t: i for t, i in vocab.items() if i is not None})
    latents = Idefics2Config.from_hf(dict(raw)).perceiver.n_latents
    if found.image_seq_len != latents:
        raise ModelLoadError(
            folder, f"image_seq_len {found.image_seq_len} differs from the resampler's {latents} latents"
        )
    return found


FAMILY = VisionFamily(
    name="idefics2",
    text_config=text_config,
    processor=processor,
    tower=lambda raw: Idefics2VisionTower(Idefics2Config.from_hf(dict(raw))),
    tower_names=lambda path: [idefics2_checkpoint_name(path)],
    text_names=lambda name: [idefics2_text_tensor(name)],
)
