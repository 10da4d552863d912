"""Image preprocessing in NumPy + Pillow that every image processor shares, step for step what
transformers' PIL image processors do (`convert_to_rgb`, `load_image`, `image_transforms.resize`,
`center_crop`, `rescale`, `normalize`), so pixel values match exactly: Pillow resamples the uint8 image,
crops count from `(size - crop) // 2`, rescaling goes through float64, normalization runs in float32."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

# transformers' OPENAI_CLIP_MEAN / _STD, the defaults of CLIP's processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' PILImageResampling values as stored in preprocessor_config.json
RESAMPLING = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR}
RESAMPLING |= {3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB with any alpha dropped: transformers' `load_image`, which the
    Idefics 2 processor runs on every image before its image processor."""
    return ImageOps.exif_transpose(image).convert("RGB")


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) with the short side `shortest` and the long side scaled and truncated, as
    transformers' `get_resize_output_image_size(default_to_square=False)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def resize(chw: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """A uint8 `[3, H, W]` image resized by Pillow with the `resample` filter (a PIL enum value)."""
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(chw, 0, -1)))
    return np.moveaxis(np.asarray(pil.resize((width, height), resample=resample)), -1, 0)


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre `height x width` of `[C, H, W]`, zero-padded first where the image is smaller."""
    h, w = chw.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((chw.shape[0], new_h, new_w), chw.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : max(0, top) + height, max(0, left) : max(0, left) + width]


def rescale_normalize(
    chw: np.ndarray, scale: float | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """uint8 `[3, H, W]` -> float32: `x * scale` computed in f64 then cast, then `(x - mean) / std` in f32
    (transformers' `rescale` and `normalize`, bit for bit); `None` skips a step."""
    x = chw.astype(np.float32) if scale is None else (chw.astype(np.float64) * scale).astype(np.float32)
    if mean is not None and std is not None:
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        x = (x - m) / s
    return x


def pad_to_square(chw: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """The image centred on a square canvas of `fill` colour (LLaVA's `expand2square`)."""
    _, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.empty((chw.shape[0], side, side), chw.dtype)
    out[:] = np.asarray(fill, chw.dtype)[:, None, None]
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = chw
    return out
