"""GET /health (503 until the engine runs) and GET /metrics (Prometheus text); both need no API key."""

from __future__ import annotations

from litestar import Response, get

from server.context import ServerContext
from server.metrics import CONTENT_TYPE


@get("/health")
async def health(ctx: ServerContext) -> dict[str, str]:
    ctx.ready_driver()  # 503 before startup finished
    return {"status": "ok"}


@get("/metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: ServerContext) -> Response[bytes]:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
