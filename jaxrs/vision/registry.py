"""config.json `model_type` -> vision-language family. A family is a module in `jaxrs/vision/` defining
`FAMILY = VisionFamily(...)`; adding one is that module plus a line in `FAMILY_MODULES` (imported on
first use, so an unused family costs nothing)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flax import nnx
from PIL import Image

from jaxrs.errors import JaxrsError
from jaxrs.vision.image_input import ImageInput

FAMILY_MODULES = {
    "llava": "jaxrs.vision.llava",
    "llava_next": "jaxrs.vision.llava_next",
    "idefics2": "jaxrs.vision.idefics2",
    "phi3_v": "jaxrs.vision.phi3_vision",
}


class Processor(Protocol):
    """A family's image processor: PIL image in, `ImageInput` out; `marker` is what the chat template
    renders for one image. A processor whose model tokenizes the prompt around its images in a way of
    its own also defines `assemble(tokenizer, text, images) -> (ids, ImagePrompt)` (see
    `jaxrs.vision.prompt.assemble_prompt`)."""

    marker: str

    def __call__(self, image: Image.Image) -> ImageInput: ...


@dataclasses.dataclass(frozen=True)
class VisionFamily:
    """How one family loads: its text model's config, its processor, its tower (built abstractly from
    the config; parameter paths mirror the checkpoint's names) and where the checkpoint keeps them.

    `tower_names(path)`: the checkpoint names a tower parameter path may have, first found wins.
    `text_names(name)`: the same for the text model's HF names (`model.layers.0...`, `lm_head.weight`).
    `batchable`: images without extras may share one tower call (tiles stacked).
    `static_extras`: extras that fix the tower's output shape (a crop grid); they reach the tower as
    host arrays, part of the compiled shape, never traced.
    """

    name: str
    text_config: Callable[[Mapping[str, Any]], dict]
    processor: Callable[[Path, Mapping[str, Any], Any], Processor]  # (folder, config.json, tokenizer)
    tower: Callable[[Mapping[str, Any]], nnx.Module]
    tower_names: Callable[[str], list[str]]
    text_names: Callable[[str], list[str]]
    batchable: bool = True
    static_extras: tuple[str, ...] = ()


def family_for(model_type: str) -> VisionFamily | None:
    """The family of a config.json `model_type`, or None for a text-only model."""
    module = FAMILY_MODULES.get(model_type)
    if module is None:
        return None
    try:
        return importlib.import_module(module).FAMILY
    except ModuleNotFoundError as e:
        raise JaxrsError(f"vision family {model_type!r} is not available in this build ({e})") from None


def feature_rows(image: ImageInput) -> int:
    """How many tower feature rows the image's prompt tokens take."""
    return int(np.count_nonzero(image.feature_mask))
