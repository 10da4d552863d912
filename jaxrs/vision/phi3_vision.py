"""Phi-3 Vision (Phi3VForCausalLM): the HD transform, the 2x2 patch merge with its learned separators,
the projection MLP and the processor. The CLIP ViT-L/14-336 encoder is the shared CLIP module; this file
takes its patch features.

There is no transformers class: this is a port of the modeling code Microsoft published with the model
(microsoft/Phi-3-vision-128k-instruct on the Hugging Face Hub: `image_processing_phi3_v.py`,
`image_embedding_phi3_v.py`, `modeling_phi3_v.py`), read and re-expressed, not copied:

- Processor: the image is converted to RGB and, when taller than wide, transposed so the long side is
  horizontal. The largest `scale` with `scale * ceil(scale / ratio) <= num_crops` gives a width of
  `scale * 336` and a height of `int(width / ratio)` (Pillow bilinear resize), padded with white to a
  multiple of 336 (split top/bottom, the extra row at the bottom), then transposed back. Pixels are
  divided by 255 and normalized in float32 (CLIP mean/std). The tiles are a global view (the whole
  padded image resized to 336 x 336 with torch's bicubic, no antialias, on normalized values) followed by
  the 336 x 336 crops in row-major order. The reference pads the crop axis to `num_crops + 1` with zero
  tiles for batching; they carry no features and are not produced here.
- Features: CLIP's second-to-last layer, CLS dropped: `[tiles, 24 * 24, 1024]`. Each tile's 24 x 24
  grid is merged 2 x 2 into 12 x 12 rows of `4 * 1024` (channel order: row offset, column offset,
  channel). The crops are laid out as their `h_crop x w_crop` grid (`h_crop * 12` rows of
  `w_crop * 12`), each row followed by `sub_GN`; then one `glb_GN`; then the global view's 12 rows of
  12, each followed by `sub_GN` ("sub_glb" order). The `img_projection` MLP (Linear, exact GELU,
  Linear) maps every row to the text width.
- Tokens per image: `(h_crop * w_crop + 1) * 144 + 1 + (h_crop + 1) * 12`, all of them image rows.

The published processor turns the marker `<|image_N|>` into that many placeholder ids (negative there;
here the tokenizer's `<|image|>` id, whose embedding is replaced anyway) and tokenizes the text on each
side of a marker separately, each piece with the tokenizer's BOS: the processor's `assemble` does the
same. `FAMILY` wires it to the engine: the text model is the Phi-3 family (config.json's top-level
fields), the tower the shared CLIP then the projector, the crop grid a compile-time value.
"""

from __future__ import annotations

import math
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

from jaxrs.config import read_json
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.models.nn import Linear, value
from jaxrs.ops import Kernels
from jaxrs.vision.clip import CLIPVision, VisionConfig
from jaxrs.vision.image_input import ImageInput, content_hash
from jaxrs.vision.image_ops import to_rgb
from jaxrs.vision.prompt import ImagePrompt, place_between
from jaxrs.vision.registry import VisionFamily
from jaxrs.vision.tower_weights import load_tower_params

CROP = 336  # the published code's crop side: CLIP ViT-L/14 at 336 px
MERGED_SIDE = 12  # 24 x 24 patches per crop, merged 2 x 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MARKER_PATTERN = r"<\|image_\d+\|>"


# -- processor --------------------------------------------------------------------------------------------


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, padded width, padded height) of the HD transform."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise JaxrsError(
            f"an image of {width}x{height} pixels is too elongated for {num_crops} crops of {CROP} pixels"
        )
    padded_h = math.ceil(new_h / CROP) * CROP
    if transposed:
        return new_h, new_w, padded_h, new_w
    return new_w, new_h, new_w, padded_h


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """The published token count for an image of this size."""
    _, _, padded_w, padded_h = hd_size(width, height, num_crops)
    h_crop, w_crop = padded_h // CROP, padded_w // CROP
    return (h_crop * w_crop + 1) * MERGED_SIDE**2 + 1 + (h_crop + 1) * MERGED_SIDE


def hd_transform(rgb: Image.Image, num_crops: int) -> Image.Image:
    """Resize (bilinear) so the long side is a multiple of 336, pad the short side with white to one.
    A tall image is resized while transposed, as the reference does: Pillow resizes one axis after the
    other with 8-bit rounding in between, so the order shows in the pixels."""
    transposed = rgb.width < rgb.height
    if transposed:
        rgb = rgb.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h, padded_w, padded_h = hd_size(rgb.width, rgb.height, num_crops)
    resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
    canvas.paste(resized, (0, (padded_h - new_h) // 2))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` matrix of torch's bicubic resampling (A = -0.75, half-pixel centres, no antialias,
    edge indices clamped)."""
    a, scale = -0.75, in_size / out_size
    src = scale * (np.arange(out_size) + 0.5) - 0.5
    base = np.floor(src)
    t = src - base
    taps = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for k, tap in enumerate(taps):
        np.add.at(weights, (rows, np.clip(base + k - 1, 0, in_size - 1).astype(int)), tap)
    return weights


def bicubic_resize(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 `[C, H, W]` -> `[C, height, width]` as `torch.nn.functional.interpolate(mode="bicubic")`."""
    wy, wx = _cubic_weights(chw.shape[1], height), _cubic_weights(chw.shape[2], width)
    return (wy @ chw.astype(np.float64) @ wx.T).astype(np.float32)


@dataclass(frozen=True)
class Phi3VisionProcessor:
    """One PIL image -> `ImageInput` (tiles `[1 + h_crop * w_crop, 3, 336, 336]`, global view first;
    extras `image_size`: the padded (height, width), which fixes the crop grid)."""

    image_token_id: int
    num_crops: int = 16
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    marker: str = "<|image_1|>"  # the first image; the N-th is <|image_N|> (MARKER_PATTERN)

    @classmethod
    def from_folder(cls, path: str | Path, vocab: Mapping[str, int]) -> Phi3VisionProcessor:
        """From `preprocessor_config.json`; the placeholder id is `<|image|>`'s (0 when the vocabulary
        has none: any id serves, its embedding is replaced)."""
        pre = read_json(Path(path) / "preprocessor_config.json")
        return cls(
            image_token_id=int(vocab.get("<|image|>", 0)),
            num_crops=int(pre.get("num_crops", 1)),
            image_mean=tuple(pre.get("image_mean") or CLIP_MEAN),
            image_std=tuple(pre.get("image_std") or CLIP_STD),
        )

    def assemble(
        self, tokenizer: Any, text: str, images: Sequence[ImageInput]
    ) -> tuple[list[int], ImagePrompt]:
        """The published prompt assembly: the text on each side of every `<|image_N|>` marker tokenized
        on its own, each piece with the tokenizer's BOS. Markers take the images in the order they
        appear (the chat path writes them in that order)."""
        return place_between(tokenizer, re.split(MARKER_PATTERN, text), images, add_special_tokens=True)

    def __call__(self, image: Image.Image) -> ImageInput:
        rgb = to_rgb(image)
        padded = hd_transform(rgb, self.num_crops)
        mean = np.asarray(self.image_mean, np.float32)[:, None, None]
        std = np.asarray(self.image_std, np.float32)[:, None, None]
        chw = (
            np.asarray(padded, np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean
        ) / std
        h, w = chw.shape[1:]
        crops = (
            chw.reshape(3, h // CROP, CROP, w // CROP, CROP)
            .transpose(1, 3, 0, 2, 4)
            .reshape(-1, 3, CROP, CROP)
        )
        tiles = np.concatenate([bicubic_resize(chw, CROP, CROP)[None], crops])
        count = num_image_tokens(rgb.width, rgb.height, self.num_crops)
        return ImageInput(
            pixel_values=np.ascontiguousarray(tiles, dtype=np.float32),
            prompt_tokens=(self.image_token_id,) * count,
            feature_mask=np.ones(count, bool),
            content_hash=content_hash(rgb),
            extras={"image_size": np.asarray([h, w], np.int64)},
        )


# -- features -> rows -------------------------------------------------------------------------------------


def merge_2x2(features: jax.Array) -> jax.Array:
    """`[n, side * side, C]` -> `[n, side / 2, side / 2, 4 * C]`: each 2 x 2 block's features side by side
    (row offset, column offset, channel)."""
    n, length, c = features.shape
    side = math.isqrt(length)
    if side * side != length or side % 2:
        raise JaxrsError(f"{length} patch features per tile are not an even square grid")
    half = side // 2
    x = features.reshape(n, half, 2, half, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, half, half, 4 * c)


def with_row_separators(grid: jax.Array, separator: jax.Array) -> jax.Array:
    """`[rows, cols, D]` -> `[rows * (cols + 1), D]`: every row followed by the separator."""
    rows, _, d = grid.shape
    return jnp.concatenate([grid, jnp.broadcast_to(separator, (rows, 1, d))], axis=1).reshape(-1, d)


@dataclass(frozen=True)
class Phi3VisionConfig:
    """The vision parts of a Phi3V config.json (`embd_layer`, `img_processor`) and the text width."""

    image_dim_out: int = 1024
    hidden_size: int = 3072

    @classmethod
    def from_hf(cls, raw: dict, where: Path | str = "config.json") -> Phi3VisionConfig:
        embd, proc = raw.get("embd_layer"), raw.get("img_processor")
        if not isinstance(embd, dict) or not isinstance(proc, dict):
            raise ModelLoadError(where, "not a Phi-3 Vision config (no embd_layer / img_processor)")
        expected = {
            "use_hd_transform": True,
            "with_learnable_separator": True,
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
        }
        for key, want in expected.items():
            if embd.get(key) != want:
                raise ModelLoadError(
                    where, f"embd_layer.{key} = {embd.get(key)!r} is unsupported (want {want!r})"
                )
        return cls(image_dim_out=int(proc.get("image_dim_out", 1024)), hidden_size=int(raw["hidden_size"]))


class Phi3VisionProjector(nnx.Module):
    """Patch features of one image's tiles (global view first) -> its rows in the text width."""

    def __init__(self, cfg: Phi3VisionConfig):
        merged = 4 * cfg.image_dim_out
        self.glb_GN = nnx.Param(jnp.zeros((1, 1, merged), jnp.float32))
        self.sub_GN = nnx.Param(jnp.zeros((1, 1, 1, merged), jnp.float32))
        self.proj_in = Linear(merged, cfg.hidden_size, bias=True)
        self.proj_out = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def __call__(
        self, features: jax.Array, crop_grid: tuple[int, int], kernels: Kernels = Kernels()
    ) -> jax.Array:
        """`features` `[1 + h_crop * w_crop, patches, C]`; `crop_grid` (h_crop, w_crop), static."""
        h_crop, w_crop = crop_grid
        if features.shape[0] != 1 + h_crop * w_crop:
            raise JaxrsError(
                f"{features.shape[0]} tiles do not hold a global view and {h_crop}x{w_crop} crops"
            )
        merged = merge_2x2(features)
        _, half, _, d = merged.shape
        sub_sep = value(self.sub_GN).reshape(1, 1, d).astype(merged.dtype)
        crops = merged[1:].reshape(h_crop, w_crop, half, half, d).transpose(0, 2, 1, 3, 4)
        rows = jnp.concatenate(
            [
                with_row_separators(crops.reshape(h_crop * half, w_crop * half, d), sub_sep),
                value(self.glb_GN).reshape(1, d).astype(merged.dtype),
                with_row_separators(merged[0], sub_sep),
            ]
        )
        hidden = jax.nn.gelu(self.proj_in(rows, kernels), approximate=False)
        return self.proj_out(hidden, kernels)


def crop_grid(image_size: np.ndarray) -> tuple[int, int]:
    """(h_crop, w_crop) from an `ImageInput`'s `image_size` extra (the padded height, width)."""
    h, w = (int(v) for v in np.asarray(image_size).reshape(-1)[:2])
    return h // CROP, w // CROP


class Phi3VisionTower(nnx.Module):
    """CLIP (any module mapping pixels `[tiles, 3, 336, 336]` to its second-to-last layer's patch
    features `[tiles, 576, C]`, CLS dropped) then the projector. `image_size` must be concrete: it fixes
    the crop grid and so the number of rows."""

    def __init__(self, encoder: nnx.Module, projector: Phi3VisionProjector):
        self.encoder, self.projector = encoder, projector

    def __call__(self, pixel_values: jax.Array, *, image_size: np.ndarray, kernels: Kernels = Kernels()):
        return self.projector(self.encoder(pixel_values), crop_grid(image_size), kernels)


PROJECTOR_PREFIX = "model.vision_embed_tokens."
CLIP_PREFIX = PROJECTOR_PREFIX + "img_processor."  # the CLIP encoder's names in the checkpoint
_PROJECTOR_NAMES = {"proj_in": "img_projection.0", "proj_out": "img_projection.2"}


def projector_checkpoint_name(path: str) -> str:
    head, _, rest = path.partition(".")
    return PROJECTOR_PREFIX + (f"{_PROJECTOR_NAMES[head]}.{rest}" if head in _PROJECTOR_NAMES else path)


def load_phi3_vision_projector(folder: str | Path) -> tuple[Phi3VisionProjector, Phi3VisionConfig]:
    """The projector with its weights (f32) from a Phi-3 Vision folder (config.json + safetensors)."""
    folder = Path(folder)
    file = folder / "config.json"
    cfg = Phi3VisionConfig.from_hf(read_json(file), file)
    abstract = nnx.eval_shape(lambda: Phi3VisionProjector(cfg))
    params = load_tower_params(folder, abstract, projector_checkpoint_name)
    return nnx.merge(nnx.split(abstract)[0], params), cfg


# CLIP ViT-L/14-336, which the published code builds for `img_processor.name == "clip_vision_model"`
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": CROP,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def clip_config(raw: Mapping) -> VisionConfig:
    """The CLIP encoder: ViT-L/14-336 (a smaller one where `img_processor.vision_config` names its
    shape), read at `img_processor.layer_idx` (the second-to-last layer), the class token dropped."""
    proc = raw.get("img_processor") or {}
    if proc.get("name", "clip_vision_model") != "clip_vision_model":
        raise JaxrsError(f"unsupported Phi-3 Vision image encoder {proc.get('name')!r} (CLIP only)")
    vc = CLIP_L_336 | (proc.get("vision_config") or {})
    cfg = VisionConfig.from_hf(vc, proc.get("layer_idx", -2), "default")
    if cfg.image_size != CROP or cfg.grid != 2 * MERGED_SIDE:
        raise JaxrsError(f"the CLIP encoder must take {CROP} px tiles in a 24 x 24 patch grid")
    if cfg.hidden_size != proc.get("image_dim_out", cfg.hidden_size):
        raise JaxrsError(f"img_processor.image_dim_out {proc['image_dim_out']} is not CLIP's width")
    return cfg


def text_config(raw: Mapping) -> dict:
    """The text model's config.json dict: the Phi-3 family, its fields at the top level."""
    text = {k: v for k, v in raw.items() if k not in ("architectures", "embd_layer", "img_processor")}
    return text | {"model_type": "phi3"}


def tower(raw: Mapping) -> Phi3VisionTower:
    cfg = Phi3VisionConfig.from_hf(dict(raw))
    return Phi3VisionTower(CLIPVision(clip_config(raw)), Phi3VisionProjector(cfg))


def tower_names(path: str) -> list[str]:
    """`encoder.*` -> the CLIP under `img_processor.vision_model.` (or `img_processor.`, as newer
    transformers saves a CLIPVisionModel); `projector.*` -> the projector's."""
    head, _, rest = path.partition(".")
    if head == "encoder":
        return [f"{CLIP_PREFIX}vision_model.{rest}", f"{CLIP_PREFIX}{rest}"]
    return [projector_checkpoint_name(rest)]


FAMILY = VisionFamily(
    name="phi3_v",
    text_config=text_config,
    processor=lambda folder, raw, tok: Phi3VisionProcessor.from_folder(
        folder, {"<|image|>": i} if (i := tok.token_to_id("<|image|>")) is not None else {}
    ),
    tower=tower,
    tower_names=tower_names,
    text_names=lambda name: [name],
    static_extras=("image_size",),
)
