from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: what the tower eats and what the prompt gets in its place."""

    pixel_values: np.ndarray  # float32, [tiles, 3, H, W] (tiles=1 when not tiled)
    prompt_tokens: tuple[int, ...]  # token ids inserted into the prompt where the image's marker was
    # bool, len(prompt_tokens): True where a tower feature row replaces the embedding
    feature_mask: np.ndarray
    content_hash: bytes  # sha256 over the decoded pixels (RGB bytes) and the (width, height)
    # family-specific arrays (masks, sizes, ...)
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)
