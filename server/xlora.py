"""The X-LoRA response extension: a request with `"xlora_scalings": true` gets each choice's latest
scalings (the classifier's output for the last position fed, `[lora layers][experts]`), or null for a
choice that ran no X-LoRA."""

from __future__ import annotations

from server.context import ServerContext


def xlora_scalings(ctx: ServerContext, request_id: str, n: int) -> list[list[list[float]] | None]:
    xlora = ctx.llm.engine.xlora if ctx.llm.generates else None
    latest = [None if xlora is None else xlora.latest(request_id, i) for i in range(n)]
    return [None if s is None else s.tolist() for s in latest]
