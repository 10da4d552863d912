"""Chat messages with image content parts -> prompt token ids and placed images. Image parts become
the model's marker in the message text (the chat template renders it where the image was); after
tokenizing, each marker is replaced by its image's prompt tokens. A template that reads OpenAI-style typed
parts (`message['content'] | selectattr('type', ...)`, as LLaVA's and Idefics 2's published templates do,
which render a plain string as nothing) gets them back: text parts and `{"type": "image"}` per marker."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from jaxrs.chat_template import extra_template_variables
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


def _is_part(part: Any) -> bool:
    """A text or image content part (what `split_images` turns into plain parts)."""
    return isinstance(part, Image.Image) or (
        isinstance(part, Mapping) and part.get("type") in ("text", *IMAGE_PART_TYPES)
    )


def split_images(
    messages: Sequence[Mapping[str, Any]], marker: str | None
) -> tuple[list[dict[str, Any]], list[object]]:
    """Messages whose list contents of text and image parts become plain parts (`{"type": "text", "text"}`
    and `{"type": "image"}`, which `template_contents` hands to the template as it reads them; a tool
    result's are joined into text), and the image sources in order. `marker` None (a text-only model)
    refuses any image."""
    out, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list) or not (
            all(_is_part(p) for p in content) or any(image_source(p) is not None for p in content)
        ):
            out.append(dict(message))
            continue
        parts = []
        for j, part in enumerate(content):
            source = image_source(part)
            if source is None:
                parts.append(text_part(str(part.get("text") or "")))
                continue
            if marker is None:
                raise ImageError(f"messages[{i}].content[{j}] is an image; this model is text-only")
            parts.append(IMAGE_PART)
            sources.append(source)
        out.append({**message, "content": joined(parts, marker) if message.get("role") == "tool" else parts})
    return out, sources


IMAGE_PART = {"type": "image"}


def text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _is_plain_part(part: Any) -> bool:
    """A part as `split_images` writes them: `{"type": "text", "text": str}` or `{"type": "image"}`."""
    return part == IMAGE_PART or (
        isinstance(part, Mapping) and part.keys() == {"type", "text"} and part["type"] == "text"
    )


def joined(parts: Sequence[Mapping[str, Any]], marker: str | None) -> str:
    """Plain parts as one text for a template of strings: a newline between parts, `marker` per image."""
    return "\n".join(str(marker) if p == IMAGE_PART else p["text"] for p in parts)


_PROBE = "q7probe"


@functools.lru_cache(maxsize=16)
def _typed_template(tokenizer: Any, template: str, marker: str | None) -> bool:
    """Whether `template` should get typed content parts: it renders a typed text part as its text (not
    the list's repr) and, for a vision model, a `{"type": "image"}` part as `marker`; for a text-only model
    only where it renders a plain string as nothing."""

    def render(content: Any) -> str:
        try:
            messages = [{"role": "user", "content": content}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        except JaxrsError:
            return ""

    typed = render([{"type": "text", "text": _PROBE}])
    if _PROBE not in typed or "'text'" in typed or '"text"' in typed:  # the list's repr or JSON
        return False
    if marker is not None:
        return marker in render([{"type": "image"}, {"type": "text", "text": _PROBE}])
    return _PROBE not in render(_PROBE)


def _typed_parts(text: str, marker: str | None) -> list[dict[str, str]]:
    """`split_images`' joined text back as parts: the text around each marker (less the newline that joined
    it) and an image part per marker."""
    pieces = text.split(marker) if marker else [text]
    parts = []
    for k, piece in enumerate(pieces):
        piece = piece.removeprefix("\n") if k > 0 else piece
        piece = piece.removesuffix("\n") if k < len(pieces) - 1 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
        if k < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


def template_contents(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], marker: str | None
) -> list[dict[str, Any]]:
    """`messages` (string contents with images as `marker`, or `split_images`' plain parts) as the chat
    template reads them: strings for a template of strings (parts joined); typed parts, each text part
    apart as transformers hands them, for one that reads parts (see `_typed_template`)."""
    template = getattr(tokenizer, "chat_template", None)
    typed = bool(template) and _typed_template(tokenizer, template, marker)

    def content(value: Any) -> Any:
        if isinstance(value, str):
            return _typed_parts(value, marker) if typed else value
        if isinstance(value, list) and all(_is_plain_part(p) for p in value):
            return [dict(p) for p in value] if typed else joined(value, marker)
        return value

    return [{**m, "content": content(m["content"])} if "content" in m else dict(m) for m in messages]


def load_images(
    sources: Sequence[object],
    vision: VisionModel,
    policy: MediaPolicy,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """Each source loaded under `policy` and preprocessed by the model's processor; a load error names the
    image by its `names` entry (where the request holds it), else as "image k", and carries that name
    (`ImageError.image`)."""
    if len(sources) > policy.limit_images:
        raise ImageError(f"{len(sources)} images in one prompt; the limit is {policy.limit_images}")
    images = []
    for source, name in zip(sources, names or [f"image {k}" for k in range(len(sources))], strict=True):
        try:
            image = load_image(source, policy, name)
        except ImageError as e:
            e.image = name
            raise
        images.append(vision.processor(image))
    return images


def chat_inputs(
    tokenizer: Any,
    vision: VisionModel | None,
    messages: Sequence[Mapping[str, Any]],
    policy: MediaPolicy,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_variables: Mapping[str, Any] | None = None,
) -> tuple[list[int], ImagePrompt | None]:
    """Token ids of the rendered conversation (with `tools` for the template, if given; the final
    message left open with `continue_final_message`; `template_variables`: more template variables, as
    `extra_template_variables` checks them) with the images placed (None: no images)."""
    marker = vision.marker if vision is not None else None
    texts, sources = split_images(messages, marker)
    texts = template_contents(tokenizer, texts, marker)
    images = load_images(sources, vision, policy) if sources else []
    text = tokenizer.apply_chat_template(
        texts,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        continue_final_message=continue_final_message,
        **extra_template_variables(template_variables),
    )
    try:
        return assemble_prompt(tokenizer, text, vision, images)
    except JaxrsError as e:  # the images do not fit the rendered prompt
        raise ImageError(str(e)) from None
