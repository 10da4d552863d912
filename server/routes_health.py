"""GET /health (503 until the generation engine runs) and GET /metrics (Prometheus); no API key needed."""

from __future__ import annotations

from litestar import Response, get

from server.context import ServerContext
from server.metrics import CONTENT_TYPE


@get("/health")
async def health(ctx: ServerContext) -> dict[str, str]:
    if ctx.llm.generates:  # an embedding model is ready once loaded
        ctx.ready_driver()  # 503 before startup finished
    return {"status": "ok"}


@get("/metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: ServerContext) -> Response[bytes]:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
