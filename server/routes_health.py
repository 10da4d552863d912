"""GET /health (503 until the generation engine runs) and GET /metrics (Prometheus); no API key needed.

The engine runs, and /health answers 200, once the warm-up's first step shapes have compiled; while the
rest compile in the background, /health says how many are left (`compiling`). An embedding model is ready
once loaded."""

from __future__ import annotations

from litestar import Response, get

from server.context import ServerContext
from server.metrics import CONTENT_TYPE


@get("/health")
async def health(ctx: ServerContext) -> dict[str, str | int]:
    if not ctx.llm.generates:  # an embedding model is ready once loaded
        return {"status": "ok"}
    ctx.ready_driver()  # 503 before startup finished
    pending = ctx.llm.engine.stats().pending_shapes
    return {"status": "ok", "compiling": pending} if pending else {"status": "ok"}


@get("/metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: ServerContext) -> Response[bytes]:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
