"""Images in chat requests: loaded and preprocessed off the event loop (a slow URL delays only its own
request), placed in the prompt; every failure is a 400 naming the image."""

from __future__ import annotations

import asyncio
from typing import Any

from jaxrs.errors import JaxrsError
from jaxrs.vision.chat import load_images, template_contents
from jaxrs.vision.image_input import ImageInput
from jaxrs.vision.prompt import ImagePrompt, assemble_prompt
from server.context import ServerContext
from server.errors import APIError


def image_marker(ctx: ServerContext) -> str | None:
    """The text the chat template renders for an image; None for a text-only model."""
    vision = ctx.llm.engine.model.vision
    return vision.marker if vision is not None else None


def template_messages(ctx: ServerContext, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the content form the chat template reads (typed parts where it needs them)."""
    return template_contents(ctx.chat_tokenizer, messages, image_marker(ctx))


async def load_request_images(ctx: ServerContext, sources: list[tuple[str, str]]) -> list[ImageInput]:
    """The request's images, `(url, where the request holds it)` each, loaded and preprocessed; a bad one
    is a 400 naming its place (`messages[i].content[j]`)."""
    if not sources:
        return []
    llm = ctx.llm
    urls, names = [url for url, _ in sources], [name for _, name in sources]
    try:
        return await asyncio.to_thread(load_images, urls, llm.engine.model.vision, llm.media, names)
    except JaxrsError as e:
        place = getattr(e, "image", None) or "messages"  # the part a bad image came from
        raise APIError(400, str(e), param=place, code="invalid_image") from None


def place_request_images(
    ctx: ServerContext, text: str, images: list[ImageInput]
) -> tuple[list[int], ImagePrompt | None]:
    """Token ids of the rendered prompt `text` with the images placed (the model's prompt assembly)."""
    try:
        return assemble_prompt(ctx.chat_tokenizer, text, ctx.llm.engine.model.vision, images)
    except JaxrsError as e:
        raise APIError(400, f"{e}: the chat template did not render every image", param="messages") from None
