"""POST /v1/images/generations request and response bodies (OpenAI's shapes) as msgspec Structs;
`seed`, `num_inference_steps` and `guidance_scale` are extensions."""

from __future__ import annotations

import msgspec


class ImageRequest(msgspec.Struct, kw_only=True):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "1024x1024"
    response_format: str = "url"  # "url" | "b64_json" (checked by the route, to name both)
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    quality: str | None = None  # accepted and ignored, as are style and user
    style: str | None = None
    user: str | None = None


class ImageData(msgspec.Struct, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None


class ImageList(msgspec.Struct):
    created: int
    data: list[ImageData]
