"""LLaVA 1.5: CLIP ViT features from one hidden layer (class token dropped by the "default" strategy),
a two-layer MLP projector into the text model's width, and one `<image>` token per feature row.

The processor equals transformers' `CLIPImageProcessor` + `LlavaProcessor` (optionally
`LlavaImageProcessor`'s pad-to-square): RGB, resize the shortest edge (Pillow, the configured filter),
centre crop, rescale, normalize; the token count is the processor's
`(crop_h // patch) * (crop_w // patch) + num_additional_image_tokens - (1 if "default")`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from jaxrs.config import read_json
from jaxrs.errors import JaxrsError
from jaxrs.models.nn import Linear
from jaxrs.models.prenorm_encoder import DENSE, encoder_activation
from jaxrs.vision import image_ops
from jaxrs.vision.clip import CLIPVision, VisionConfig
from jaxrs.vision.image_input import ImageInput, content_hash
from jaxrs.vision.registry import VisionFamily

log = logging.getLogger("jaxrs")

# A LLaVA config.json often lists only what differs from transformers' Llama defaults.
LLAMA_DEFAULTS = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def text_config(raw: Mapping[str, Any]) -> dict:
    """The text model's config.json dict: `text_config` over Llama's defaults."""
    text = dict(raw.get("text_config") or {})
    defaults = LLAMA_DEFAULTS if text.get("model_type", "llama") in ("llama", "mistral") else {}
    return {**defaults, **text}


def vision_config(raw: Mapping[str, Any]) -> VisionConfig:
    vc = raw.get("vision_config") or {}
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise JaxrsError(f"unsupported LLaVA vision tower {vc.get('model_type')!r} (CLIP only)")
    return VisionConfig.from_hf(
        vc, raw.get("vision_feature_layer", -2), raw.get("vision_feature_select_strategy", "default")
    )


class Projector(nnx.Module):
    """`linear_2(act(linear_1(x)))`: vision features into the text model's embedding space."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool):
        self.linear_1 = Linear(in_features, hidden, bias=bias)
        self.linear_2 = Linear(hidden, hidden, bias=bias)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(encoder_activation(self.linear_1(x, DENSE), self.act), DENSE)


class LlavaTower(nnx.Module):
    """Pixels `[tiles, 3, H, W]` -> `[tiles * rows, text_hidden]`: CLIP features, projected."""

    def __init__(self, raw: Mapping[str, Any]):
        vcfg = vision_config(raw)
        hidden = text_config(raw)["hidden_size"]
        self.vision_tower = CLIPVision(vcfg)
        self.multi_modal_projector = Projector(
            vcfg.feature_size,
            hidden,
            raw.get("projector_hidden_act", "gelu"),
            raw.get("multimodal_projector_bias", True),
        )

    def __call__(self, pixel_values: jax.Array, **extras: jax.Array) -> jax.Array:
        out = self.multi_modal_projector(self.vision_tower(pixel_values))
        return out.reshape(-1, out.shape[-1])


def _hw(value: Any, default: int) -> tuple[int, int]:
    """A size field as (height, width): an int, {"height", "width"} or {"shortest_edge"}."""
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if "height" in value:
        return int(value["height"]), int(value["width"])
    return int(value["shortest_edge"]), int(value["shortest_edge"])


class ClipImageProcessing:
    """transformers' CLIP-style image processor settings (preprocessor_config.json) and the pixels they
    make: RGB -> [pad to square] -> resize -> centre crop -> rescale -> normalize, `[3, H, W]` float32."""

    def __init__(self, raw: Mapping[str, Any]):
        size = raw.get("size", {"shortest_edge": 224})
        self.shortest_edge = size if isinstance(size, int) else size.get("shortest_edge")
        self.size = None if self.shortest_edge else _hw(size, 224)
        self.crop = _hw(raw.get("crop_size"), 224)
        self.do_resize = raw.get("do_resize", True)
        self.do_center_crop = raw.get("do_center_crop", True)
        self.do_pad = raw.get("do_pad", False)  # LlavaImageProcessor: pad to square with the mean colour
        self.resample = int(raw.get("resample", Image.Resampling.BICUBIC))
        self.scale = raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else None
        normalize = raw.get("do_normalize", True)
        self.mean = raw.get("image_mean", image_ops.CLIP_MEAN) if normalize else None
        self.std = raw.get("image_std", image_ops.CLIP_STD) if normalize else None

    def pixels(self, rgb: Image.Image) -> np.ndarray:
        chw = np.moveaxis(np.asarray(rgb), -1, 0)
        if self.do_pad:
            chw = image_ops.pad_to_square(chw, [int(m * 255) for m in self.mean or (0, 0, 0)])
        return self.finish(chw)

    def finish(self, chw: np.ndarray) -> np.ndarray:
        """Resize, crop, rescale and normalize a uint8 `[3, H, W]`."""
        if self.do_resize:
            h, w = chw.shape[1:]
            if self.shortest_edge:
                h, w = image_ops.shortest_edge_size(h, w, self.shortest_edge)
            else:
                h, w = self.size
            chw = image_ops.resize(chw, h, w, self.resample)
        if self.do_center_crop:
            chw = image_ops.center_crop(chw, *self.crop)
        return image_ops.rescale_normalize(chw, self.scale, self.mean, self.std)

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the pixels made (the crop, else the resize target)."""
        if self.do_center_crop or self.shortest_edge:
            return self.crop
        return self.size


def image_token_id(raw: Mapping[str, Any], tokenizer: Any, token: str) -> int:
    """The image placeholder id: config.json's, else the tokenizer's id of `token`."""
    found = raw.get("image_token_index", raw.get("image_token_id"))
    if found is None and tokenizer is not None:
        found = tokenizer.token_to_id(token)
    if found is None:
        raise JaxrsError(f"the model names no image token id and the tokenizer has no {token!r}")
    return int(found)


def folder_settings(folder: Path, raw: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], dict, dict]:
    """(config.json, or `raw` when given; preprocessor_config.json; processor_config.json), the last two
    {} when absent."""
    raw = raw if raw is not None else read_json(folder / "config.json")
    pre, proc = folder / "preprocessor_config.json", folder / "processor_config.json"
    return raw, (read_json(pre) if pre.is_file() else {}), (read_json(proc) if proc.is_file() else {})


class LlavaProcessor:
    """PIL image -> `ImageInput`: the CLIP pixels and one image token per feature row."""

    def __init__(self, images: ClipImageProcessing, token_id: int, marker: str, num_tokens: int):
        self.images, self.token_id, self.marker, self.num_tokens = images, token_id, marker, num_tokens

    @classmethod
    def from_folder(
        cls, folder: str | Path, raw: Mapping[str, Any] | None = None, tokenizer: Any = None
    ) -> LlavaProcessor:
        folder = Path(folder)
        raw, pre, proc = folder_settings(folder, raw)
        images = ClipImageProcessing(pre)
        vcfg = vision_config(raw)
        marker = proc.get("image_token", "<image>")
        patch = proc.get("patch_size") or vcfg.patch_size
        strategy = proc.get("vision_feature_select_strategy") or raw.get(
            "vision_feature_select_strategy", "default"
        )
        h, w = images.output_hw
        count = (
            (h // patch) * (w // patch) + proc.get("num_additional_image_tokens", 0) - (strategy == "default")
        )
        rows = vcfg.grid**2 + (0 if vcfg.drop_cls else 1)
        if count != rows:  # transformers fails at run time on such a folder; the tower's count is right
            log.warning(
                "%s: the processor's %d image tokens differ from the tower's %d rows; using %d",
                folder,
                count,
                rows,
                rows,
            )
        return cls(images, image_token_id(raw, tokenizer, marker), marker, rows)

    @property
    def warmup_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of images whose shapes cover every request: one, all tiles are equal."""
        h, w = self.images.output_hw
        return [(w, h)]

    def __call__(self, image: Image.Image) -> ImageInput:
        rgb = image_ops.to_rgb(image)
        pixels = self.images.pixels(rgb)[None]
        return ImageInput(
            pixel_values=pixels,
            prompt_tokens=(self.token_id,) * self.num_tokens,
            feature_mask=np.ones(self.num_tokens, bool),
            content_hash=content_hash(rgb),
        )


def tower_names(path: str) -> list[str]:
    """transformers has saved the tower as `vision_tower.vision_model.*` and `vision_tower.*`, with or
    without `model.` in front."""
    names = [path]
    if path.startswith("vision_tower."):
        names.append("vision_tower.vision_model." + path[len("vision_tower.") :])
    return names + ["model." + n for n in names]


def text_names(name: str) -> list[str]:
    """`model.layers...` / `lm_head.weight` as LLaVA checkpoints spell them."""
    if name.startswith("model."):
        return [name, "language_model." + name, "model.language_model." + name[len("model.") :]]
    return [name, "language_model." + name]


FAMILY = VisionFamily(
    name="llava",
    text_config=text_config,
    processor=lambda folder, raw, tok: LlavaProcessor.from_folder(folder, raw, tok),
    tower=LlavaTower,
    tower_names=tower_names,
    text_names=text_names,
)
