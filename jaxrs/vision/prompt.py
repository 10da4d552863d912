"""Images placed in a prompt: where each image's tokens sit, the feature rows the tower made for them
(computed once per request, on the first prefill chunk that reaches an image, and kept through chunking,
preemption and n > 1 samples), the rows a prefill chunk takes, and the prefix-cache key that makes a
block's hash depend on the content of every image overlapping it."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.vision.encoder import VisionModel
from jaxrs.vision.image_input import ImageInput


@dataclasses.dataclass(frozen=True)
class ImageCacheKey:
    """A sequence's prefix-cache extra key: `base` (adapter, ...) plus `(start, end, content_hash)` of each
    image's token span. A block's key names only the images overlapping it; blocks after an image inherit
    it through the chain hash, so the same image reuses the cache and another image never does."""

    base: Hashable
    spans: tuple[tuple[int, int, bytes], ...]

    def block_key(self, start: int, end: int) -> Hashable:
        return (self.base, tuple(h for s, e, h in self.spans if s < end and e > start))


class ImagePrompt:
    """The images of one prompt, by the position of their first token."""

    def __init__(self, spans: Sequence[tuple[int, ImageInput]]):
        self.spans = list(spans)
        self.features: list[np.ndarray] | None = None
        # per image: for each of its tokens, its feature row (or -1 where the text embedding stays)
        self._rows = [np.where(im.feature_mask, np.cumsum(im.feature_mask) - 1, -1) for _, im in self.spans]

    @property
    def images(self) -> list[ImageInput]:
        return [im for _, im in self.spans]

    def cache_key(self, base: Hashable = None) -> ImageCacheKey:
        return ImageCacheKey(
            base, tuple((s, s + len(im.prompt_tokens), im.content_hash) for s, im in self.spans)
        )

    def overlaps(self, start: int, end: int) -> bool:
        """Whether tokens [start, end) take any feature row."""
        return any(s < end and s + len(im.prompt_tokens) > start for s, im in self.spans)

    def ensure_features(self, vision: VisionModel) -> None:
        if self.features is None:
            self.features = vision.encode(self.images)

    def fill(self, mask: np.ndarray, rows: np.ndarray, start: int, end: int) -> None:
        """Write the feature rows of tokens [start, end) into `rows[:end - start]`, and True into `mask`
        where they replace the text embedding."""
        assert self.features is not None, "features are computed before a chunk reads them"
        for (s, im), index, feats in zip(self.spans, self._rows, self.features, strict=True):
            lo, hi = max(start, s), min(end, s + len(im.prompt_tokens))
            if lo >= hi:
                continue
            which = index[lo - s : hi - s]
            take = which >= 0
            at = np.arange(lo, hi)[take] - start
            mask[at] = True
            rows[at] = feats[which[take]]


def place_images(
    ids: Sequence[int], marker_ids: Sequence[int], images: Sequence[ImageInput]
) -> tuple[list[int], ImagePrompt | None]:
    """Replace each occurrence of the marker's token ids in `ids`, in order, by the next image's
    prompt tokens; the counts must agree."""
    found, i, m = [], 0, len(marker_ids)
    while m and i <= len(ids) - m:
        if list(ids[i : i + m]) == list(marker_ids):
            found.append(i)
            i += m
        else:
            i += 1
    if len(found) != len(images):
        raise JaxrsError(f"the prompt has {len(found)} image placeholders for {len(images)} images")
    if not images:
        return list(ids), None
    out: list[int] = []
    spans, last = [], 0
    for at, image in zip(found, images, strict=True):
        out += ids[last:at]
        spans.append((len(out), image))
        out += image.prompt_tokens
        last = at + m
    out += ids[last:]
    return out, ImagePrompt(spans)


def place_between(
    tokenizer: Any, parts: Sequence[str], images: Sequence[ImageInput], *, add_special_tokens: bool = False
) -> tuple[list[int], ImagePrompt]:
    """The text `parts` around the images (`len(parts) == len(images) + 1`), each tokenized on its own,
    with each image's prompt tokens between them."""
    if len(parts) - 1 != len(images):
        raise JaxrsError(
            f"the rendered prompt holds {len(parts) - 1} image markers for {len(images)} images "
            "(does the chat template render them?)"
        )
    out: list[int] = []
    spans = []
    for k, part in enumerate(parts):
        out += tokenizer.encode(part, add_special_tokens=add_special_tokens)
        if k < len(images):
            spans.append((len(out), images[k]))
            out += images[k].prompt_tokens
    return out, ImagePrompt(spans)


def assemble_prompt(
    tokenizer: Any, text: str, vision: VisionModel | None, images: Sequence[ImageInput]
) -> tuple[list[int], ImagePrompt | None]:
    """Token ids of a rendered prompt holding one `vision.marker` per image, with the images placed.

    By default the whole text is tokenized and each marker's ids are replaced (a marker that is no
    token of the vocabulary, as with a GGUF text model, cuts the text instead). A processor with an
    `assemble(tokenizer, text, images)` method tokenizes the text its model's way (Idefics 2 merges
    adjacent images' boundary tokens; Phi-3 Vision tokenizes each piece between images on its own)."""
    if not images:
        return tokenizer.encode(text, add_special_tokens=False), None
    assert vision is not None, "images reach only a vision model's prompt"
    own = getattr(vision.processor, "assemble", None)
    if own is not None:
        return own(tokenizer, text, images)
    ids = tokenizer.encode(text, add_special_tokens=False)
    try:
        return place_images(ids, tokenizer.encode(vision.marker, add_special_tokens=False), images)
    except JaxrsError:
        return place_between(tokenizer, text.split(vision.marker), images)


def encode_chunks(chunks: Sequence[Any], vision: VisionModel | None) -> None:
    """Compute the features of the images the step's prefill chunks reach (once per request)."""
    for chunk in chunks:
        images = chunk.seq.images
        if images is not None and images.overlaps(chunk.start, chunk.end):
            images.ensure_features(vision)


def chunk_embeds(
    chunks: Sequence[tuple[Any, int, int]], b: int, t: int, hidden: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask `[b, t]`, rows `[b, t, hidden]`) of a prefill call's image features; None when no chunk has
    any, so text-only calls keep their own compiled steps."""
    reached = [
        (i, seq, s, e)
        for i, (seq, s, e) in enumerate(chunks)
        if seq.images is not None and seq.images.overlaps(s, e)
    ]
    if not reached:
        return None
    mask, rows = np.zeros((b, t), bool), np.zeros((b, t, hidden), np.float32)
    for i, seq, s, e in reached:
        seq.images.fill(mask[i], rows[i], s, e)
    return mask, rows
