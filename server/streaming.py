"""Server-sent events: `data: {json}` lines ending with `data: [DONE]`, as OpenAI streams them.

Litestar stops iterating a stream when the client disconnects but does not close the iterator; the
response's background task closes it, which aborts the engine requests behind it at once (it runs
after a disconnect as well as after a complete stream).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

import msgspec
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from server.errors import APIError
from server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("jaxrs.server")

DONE = b"data: [DONE]\n\n"


def sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _with_error_event(events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Once the 200 and the first events are out, an error can only travel as an event of its own."""
    async with contextlib.aclosing(events):
        try:
            async for chunk in events:
                yield chunk
        except Exception as e:
            if isinstance(e, APIError):
                body = ErrorBody(e.message, "server_error" if e.status >= 500 else "invalid_request_error")
            else:
                log.exception("stream failed")
                body = ErrorBody(f"internal server error: {type(e).__name__}", "server_error")
            yield sse(ErrorResponse(body))
            yield DONE


def event_stream(events: AsyncGenerator[bytes, None]) -> Stream:
    """A text/event-stream response over `events` (SSE-encoded chunks, [DONE] included)."""
    guarded = _with_error_event(events)
    return Stream(
        guarded,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(guarded.aclose),
    )
