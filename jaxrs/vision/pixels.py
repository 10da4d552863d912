"""Pixel work the image processors share, in NumPy + Pillow with transformers' arithmetic: RGB
conversion (transparency composited onto white, or dropped after EXIF orientation), the content hash,
rescale + normalize."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

# transformers' PILImageResampling values as stored in preprocessor_config.json
RESAMPLING = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR}
RESAMPLING |= {3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background (as transformers converts)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then RGB with any alpha dropped: transformers' `load_image`, which the
    Idefics 2 processor runs on every image before its image processor."""
    return ImageOps.exif_transpose(image).convert("RGB")


def content_hash(rgb: Image.Image) -> bytes:
    """sha256 over the decoded RGB bytes and the (width, height): equal for equal pixels only."""
    digest = hashlib.sha256(np.asarray(rgb, dtype=np.uint8).tobytes())
    digest.update(np.asarray(rgb.size, dtype="<u8").tobytes())
    return digest.digest()


def rescale_normalize(
    chw: np.ndarray, factor: float | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """uint8 `[3, H, W]` -> float32: `x * factor` computed in f64 then cast, then `(x - mean) / std` in f32
    (transformers' `rescale` and `normalize`, bit for bit); `None` skips a step."""
    x = chw.astype(np.float32) if factor is None else (chw.astype(np.float64) * factor).astype(np.float32)
    if mean is not None and std is not None:
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        x = (x - m) / s
    return x
