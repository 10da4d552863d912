"""The request log: one JSON line per generation request, written when the request ends.

Counts, latency, finish reasons and status always; the prompt and response text only when asked for
(`log_full_text`), since they may be private.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import msgspec


@dataclasses.dataclass
class RequestRecord:
    """Filled in by a route while it serves a request; `RequestLog.write` stamps the latency."""

    id: str
    route: str
    model: str | None = None
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    prompt: Any = None  # text, token ids or messages; only written with log_full_text
    response: list[str] | None = None
    timestamp: float = dataclasses.field(default_factory=time.time)
    start: float = dataclasses.field(default_factory=time.perf_counter)


class RequestLog:
    def __init__(self, path: str | Path, *, full_text: bool = False):
        self.path = Path(path)
        self.full_text = full_text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        line: dict[str, Any] = {
            "id": record.id,
            "time": round(record.timestamp, 3),
            "model": record.model,
            "route": record.route,
            "stream": record.stream,
            "status": record.status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "latency_s": round(time.perf_counter() - record.start, 4),
            "finish_reasons": record.finish_reasons,
        }
        if record.error is not None:
            line["error"] = record.error
        if self.full_text:
            line["prompt"] = record.prompt
            line["response"] = record.response
        data = msgspec.json.encode(line) + b"\n"
        with self._lock, self.path.open("ab") as f:  # opened per line: survives rotation and restarts
            f.write(data)
