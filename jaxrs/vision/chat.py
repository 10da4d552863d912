"""Chat messages with image content parts -> prompt token ids and placed images. Image parts become
the model's marker in the message text (the chat template renders it where the image was); after
tokenizing, each marker is replaced by its image's prompt tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from jaxrs.errors import JaxrsError
from jaxrs.vision.encoder import VisionModel
from jaxrs.vision.media import ImageError, MediaPolicy, load_image
from jaxrs.vision.prompt import ImagePrompt, assemble_prompt

IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def image_source(part: Any) -> object | None:
    """The image a content part refers to (a URL, bytes or a PIL image), or None for a text part."""
    if isinstance(part, Image.Image):
        return part
    if not isinstance(part, Mapping) or part.get("type") not in IMAGE_PART_TYPES:
        return None
    for key in ("image_url", "image", "url"):
        value = part.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if value is not None:
            return value
    raise ImageError(f"an image part without an image: {sorted(part)}")


def split_images(
    messages: Sequence[Mapping[str, Any]], marker: str | None
) -> tuple[list[dict[str, Any]], list[object]]:
    """Messages whose list contents are joined into text (parts on their own lines, as the server
    joins them), with `marker` per image, and the image sources in order. `marker` None (a text-only
    model) refuses any image."""
    out, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        texts = []
        for j, part in enumerate(content):
            source = image_source(part)
            if source is None:
                texts.append(str(part.get("text") or ""))
                continue
            if marker is None:
                raise ImageError(f"messages[{i}].content[{j}] is an image; this model is text-only")
            texts.append(marker)
            sources.append(source)
        out.append({**message, "content": "\n".join(texts)})
    return out, sources


def load_images(sources: Sequence[object], vision: VisionModel, policy: MediaPolicy) -> list[Any]:
    """Each source loaded under `policy` and preprocessed by the model's processor."""
    if len(sources) > policy.limit_images:
        raise ImageError(f"{len(sources)} images in one prompt; the limit is {policy.limit_images}")
    return [vision.processor(load_image(s, policy, f"image {k}")) for k, s in enumerate(sources)]


def chat_inputs(
    tokenizer: Any,
    vision: VisionModel | None,
    messages: Sequence[Mapping[str, Any]],
    policy: MediaPolicy,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
) -> tuple[list[int], ImagePrompt | None]:
    """Token ids of the rendered conversation (with `tools` for the template, if given; the final
    message left open with `continue_final_message`) with the images placed (None: no images)."""
    texts, sources = split_images(messages, vision.marker if vision is not None else None)
    images = load_images(sources, vision, policy) if sources else []
    text = tokenizer.apply_chat_template(
        texts,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        continue_final_message=continue_final_message,
    )
    try:
        return assemble_prompt(tokenizer, text, vision, images)
    except JaxrsError as e:  # the images do not fit the rendered prompt
        raise ImageError(str(e)) from None
