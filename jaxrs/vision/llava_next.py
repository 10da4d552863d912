"""LLaVA-NeXT (1.6): "anyres" tiling. The image is resized into the best of `image_grid_pinpoints`
(aspect kept, zero-padded to the pinpoint), cut into crop-size tiles, and preceded by the whole image
resized to one tile; every tile goes through CLIP and the projector. The grid tiles' features are laid
out as one feature map, the padding's rows or columns are cut off (unpadding), and an `image_newline`
row ends each map row. Equal to transformers' `LlavaNextImageProcessor` + `LlavaNextProcessor` (pixels
and token counts) and `LlavaNextModel.pack_image_features`.

The layout depends on the image's size, so the processor computes it on the host as a gather index into
the tower's rows (the newline is the last row); the index is padded to a power of two so images of
different sizes share compiled towers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxrs.errors import JaxrsError
from jaxrs.models.nn import _param, value
from jaxrs.vision import image_ops
from jaxrs.vision.image_input import ImageInput, content_hash
from jaxrs.vision.llava import (
    ClipImageProcessing,
    LlavaTower,
    folder_settings,
    image_token_id,
    text_config,
    text_names,
    tower_names,
    vision_config,
)
from jaxrs.vision.registry import VisionFamily
from pallas_kernels.shapes import next_power_of_2

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) keeping the most of the image's pixels, then wasting the fewest."""
    best, most, least = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (h, w), effective, wasted
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The size the image takes inside the target, aspect kept (rounded up, capped by the target)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a rows x cols feature map that the image covers (the padding cut off)."""
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


def feature_index(height: int, width: int, grid_h: int, grid_w: int, g: int) -> np.ndarray:
    """Which tower row each image token takes: the base tile's g*g rows, then the unpadded grid map row by
    row, each map row ended by the newline (index `(1 + grid_h * grid_w) * g * g`)."""
    rows, cols = grid_h * g, grid_w * g
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    tile = 1 + (r // g) * grid_w + (c // g)
    flat = tile * g * g + (r % g) * g + (c % g)
    keep_r, keep_c = unpadded(height, width, rows, cols)
    kept = flat[keep_r, keep_c]
    newline = np.full((kept.shape[0], 1), (1 + grid_h * grid_w) * g * g)
    return np.concatenate([np.arange(g * g), np.concatenate([kept, newline], 1).reshape(-1)]).astype(np.int32)


class LlavaNextTower(LlavaTower):
    """Tiles `[1 + grid, 3, S, S]` and the gather `index` -> `[len(index), text_hidden]`: LLaVA's tower
    plus the `image_newline` row that ends each feature-map row."""

    def __init__(self, raw: Mapping[str, Any]):
        if not vision_config(raw).drop_cls:
            raise JaxrsError("LLaVA-NeXT runs with vision_feature_select_strategy 'default' only")
        super().__init__(raw)
        self.image_newline = _param(text_config(raw)["hidden_size"])

    def __call__(
        self, pixel_values: jax.Array, index: jax.Array | None = None, **extras: jax.Array
    ) -> jax.Array:
        rows = super().__call__(pixel_values)
        if index is None:
            return rows
        newline = value(self.image_newline).astype(rows.dtype)[None]
        return jnp.concatenate([rows, newline])[index]


class LlavaNextProcessor:
    """PIL image -> tiles, the gather index, and one image token per feature row."""

    def __init__(self, images: ClipImageProcessing, pinpoints: list, token_id: int, marker: str, grid: int):
        self.images, self.pinpoints, self.token_id, self.marker, self.grid = (
            images,
            pinpoints,
            token_id,
            marker,
            grid,
        )
        self.tile = images.crop[0]

    @classmethod
    def from_folder(
        cls, folder: str | Path, raw: Mapping[str, Any] | None = None, tokenizer: Any = None
    ) -> LlavaNextProcessor:
        folder = Path(folder)
        raw, pre, proc = folder_settings(folder, raw)
        pinpoints = pre.get("image_grid_pinpoints") or raw.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        marker = proc.get("image_token", "<image>")
        vcfg = vision_config(raw)
        return cls(
            ClipImageProcessing(pre), pinpoints, image_token_id(raw, tokenizer, marker), marker, vcfg.grid
        )

    @property
    def warmup_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of one image per pinpoint: each gives its tile count (index buckets aside)."""
        return [(w, h) for h, w in self.pinpoints]

    def tiles(self, chw: np.ndarray) -> np.ndarray:
        """The base view then the grid tiles, each resized, cropped and normalized: `[1 + n, 3, S, S]`."""
        h, w = chw.shape[1:]
        best_h, best_w = select_best_resolution(h, w, self.pinpoints)
        new_h, new_w = fit_size(h, w, best_h, best_w)
        resized = image_ops.resize(chw, new_h, new_w, self.images.resample)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        padded = np.zeros((chw.shape[0], best_h, best_w), chw.dtype)
        padded[:, top : top + new_h, left : left + new_w] = resized
        t = self.tile
        grid = [padded[:, i : i + t, j : j + t] for i in range(0, best_h, t) for j in range(0, best_w, t)]
        side = self.images.shortest_edge or self.images.size[0]
        base_h, base_w = (side, side) if self.images.shortest_edge else self.images.size
        base = image_ops.resize(chw, base_h, base_w, self.images.resample)
        return np.stack([self.images.finish(p) for p in [base, *grid]])

    def __call__(self, image: Image.Image) -> ImageInput:
        rgb = image_ops.to_rgb(image)
        chw = np.moveaxis(np.asarray(rgb), -1, 0)
        h, w = chw.shape[1:]
        best_h, best_w = select_best_resolution(h, w, self.pinpoints)
        index = feature_index(h, w, best_h // self.tile, best_w // self.tile, self.grid)
        padded = np.zeros(next_power_of_2(len(index)), np.int32)
        padded[: len(index)] = index
        return ImageInput(
            pixel_values=self.tiles(chw),
            prompt_tokens=(self.token_id,) * len(index),
            feature_mask=np.ones(len(index), bool),
            content_hash=content_hash(rgb),
            extras={"index": padded},
        )


FAMILY = VisionFamily(
    name="llava_next",
    text_config=text_config,
    processor=lambda folder, raw, tok: LlavaNextProcessor.from_folder(folder, raw, tok),
    tower=LlavaNextTower,
    tower_names=tower_names,
    text_names=text_names,
    batchable=False,
)
