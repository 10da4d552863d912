"""POST /v1/images/generations and GET /v1/images/files/{name}: text-to-image with an `ImageModel`.

Generation runs in a worker thread, so the event loop (and the text engine's thread) keep serving chat
meanwhile. `url` images are written as PNGs to the output folder and served from it; `b64_json` images
are returned inline as plain base64 PNG.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
import uuid
from pathlib import Path

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from PIL import Image

from jaxrs.images import ImageModel, ImageRequestError
from server.body import read_json
from server.errors import APIError
from server.image_schemas import ImageData, ImageList, ImageRequest

FILES = "/images/files"
_FILE_NAME = re.compile(r"[0-9a-f]{32}-\d+\.png")
_FIELDS = {
    "prompt": "prompt",
    "n must": "n",
    "size": "size",
    "num_inference_steps": "num_inference_steps",
    "seed": "seed",
}


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _param(message: str) -> str | None:
    return next((field for prefix, field in _FIELDS.items() if message.startswith(prefix)), None)


def image_routes(model: ImageModel, output_dir: str | Path) -> list[HTTPRouteHandler]:
    """The two routes for `model`, storing `url` images in `output_dir` (created if needed)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    names = {Path(model.source).name, Path(model.source).stem, str(model.source)}

    @post("/images/generations", status_code=200)
    async def generate_images(request: Request) -> Response[ImageList]:
        req = await read_json(request, ImageRequest)
        if req.model is not None and req.model not in names:
            raise APIError(400, f"image model {req.model!r} is not served here", param="model")
        if req.response_format not in ("url", "b64_json"):
            raise APIError(
                400,
                f"response_format must be 'url' or 'b64_json', not {req.response_format!r}",
                param="response_format",
            )
        try:
            model.check(req.prompt, req.n, req.size, req.num_inference_steps, req.seed)
            images = await asyncio.to_thread(
                model.generate,
                req.prompt,
                n=req.n,
                size=req.size,
                seed=req.seed,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
            )
        except ImageRequestError as e:
            raise APIError(400, str(e), param=_param(str(e))) from None
        pngs = [png_bytes(im) for im in images]
        if req.response_format == "b64_json":
            data = [ImageData(b64_json=base64.b64encode(p).decode("ascii")) for p in pngs]
        else:
            stem, base = uuid.uuid4().hex, str(request.base_url).rstrip("/")
            data = []
            for i, png in enumerate(pngs):
                (folder / f"{stem}-{i}.png").write_bytes(png)
                data.append(ImageData(url=f"{base}/v1{FILES}/{stem}-{i}.png"))
        return Response(ImageList(int(time.time()), data))

    @get(f"{FILES}/{{name:str}}", media_type="image/png")
    async def image_file(name: str) -> Response[bytes]:
        path = folder / name
        if not _FILE_NAME.fullmatch(name) or not path.is_file():
            raise APIError(404, f"no image {name!r}")
        return Response(path.read_bytes(), media_type="image/png")

    return [generate_images, image_file]
