"""Images in chat requests: loaded and preprocessed off the event loop (a slow URL delays only its own
request), placed in the prompt; every failure is a 400 naming the image."""

from __future__ import annotations

import asyncio

from jaxrs.errors import JaxrsError
from jaxrs.vision.chat import load_images
from jaxrs.vision.image_input import ImageInput
from jaxrs.vision.prompt import ImagePrompt, place_images
from server.context import ServerContext
from server.errors import APIError


def image_marker(ctx: ServerContext) -> str | None:
    """The text the chat template renders for an image; None for a text-only model."""
    vision = ctx.llm.engine.model.vision
    return vision.marker if vision is not None else None


async def load_request_images(ctx: ServerContext, sources: list[object]) -> list[ImageInput]:
    if not sources:
        return []
    llm = ctx.llm
    try:
        return await asyncio.to_thread(load_images, sources, llm.engine.model.vision, llm.media)
    except JaxrsError as e:
        raise APIError(400, str(e), param="messages", code="invalid_image") from None


def place_request_images(
    ctx: ServerContext, ids: list[int], images: list[ImageInput]
) -> tuple[list[int], ImagePrompt | None]:
    if not images:
        return ids, None
    marker = ctx.chat_tokenizer.encode(image_marker(ctx) or "", add_special_tokens=False)
    try:
        return place_images(ids, marker, images)
    except JaxrsError as e:
        raise APIError(400, f"{e}: the chat template did not render every image", param="messages") from None
