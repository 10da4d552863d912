"""Drives the engine from a background thread for asyncio callers (the server).

The engine loop runs in its own thread (JAX releases the GIL while the device works), so the event
loop stays free to accept and stream requests. Requests and aborts cross into the engine thread
through a queue; per-request updates cross back with `call_soon_threadsafe`. A client that goes away
aborts its request, which frees its KV blocks at once. Re-quantizing the weights is a command too, so
it runs between steps and nothing races the step loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, TypeVar

from jaxrs.engine.engine import Engine, Request
from jaxrs.engine.options import MAX_WAITING
from jaxrs.engine.output_processor import stream_end
from jaxrs.engine.requantize import Requantized
from jaxrs.engine.sampling import SamplingParams
from jaxrs.engine.sequence import Sequence, TokenLogprob
from jaxrs.errors import JaxrsError
from jaxrs.quant import parse_format

T = TypeVar("T")
log = logging.getLogger("jaxrs")


class QueueFullError(JaxrsError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


@dataclasses.dataclass
class SequenceUpdate:
    """What one sample gained since the last update."""

    index: int
    text: str  # new text (stop-string prefixes held back until resolved)
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set on the last update of the sample
    stop_reason: int | str | None = None  # vLLM's: the stop token id or string that ended it (not EOS)


@dataclasses.dataclass
class RequestUpdate:
    request_id: str
    prompt_token_ids: list[int]
    updates: list[SequenceUpdate]
    num_cached_tokens: int
    finished: bool  # every sample of the request is done


@dataclasses.dataclass
class _Stream:
    """Per-sample emission state kept on the engine thread."""

    text_sent: int = 0
    tokens_sent: int = 0


@dataclasses.dataclass
class EngineStats:
    """Counters for /metrics, updated on the engine thread."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = dataclasses.field(default_factory=dict)
    requantizations: int = 0
    time_to_first_token: list[float] = dataclasses.field(default_factory=list)  # drained by metrics
    inter_token: list[float] = dataclasses.field(default_factory=list)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting: int = MAX_WAITING,
        on_finish: Callable[[Request], None] | None = None,
    ):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_finish = on_finish
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._requests: dict[str, Request] = {}  # live requests, engine thread only
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._last_token_time: dict[tuple[str, int], float] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxrs-engine", daemon=True)
        self._thread.start()

    # -- caller side (event loop) -------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.engine.stats().num_waiting + self._commands.qsize()

    @property
    def num_running(self) -> int:
        return self.engine.stats().num_running

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        cache_key: Hashable = None,
        images: Any = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestUpdate]:
        """Submit a request and yield its updates until it finishes; leaving early aborts it."""
        self.engine.validate(prompt_ids, params)
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"too many requests waiting ({self.num_waiting}); retry later")
        request_id = request_id or f"req-{next(self._ids)}"
        sink: asyncio.Queue = asyncio.Queue()
        self._sinks[request_id] = (asyncio.get_running_loop(), sink)
        self._commands.put(("add", request_id, prompt_ids, params, cache_key, images, cache_salt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._sinks.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def requantize(self, fmt: str) -> Requantized:
        """Quantize the weights to `fmt` on the engine thread, between steps (see `Engine.requantize`):
        requests arriving meanwhile wait, those in flight recompute and carry on afterwards."""
        parse_format(fmt)  # an unknown format fails at once, without waiting for the engine thread
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Requantized] = loop.create_future()
        self._commands.put(("requantize", fmt, loop, done))
        self._wake.set()
        return await done

    async def run_on_engine(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on the engine thread, between steps (LoRA adapter loads and unloads)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._commands.put(("call", fn, loop, done))
        self._wake.set()
        return await done

    async def run_on_each(self, fn: Callable[[Engine], T]) -> list[T]:
        """`run_on_engine` as a list, the shape a replica router answers with (one per engine)."""
        return [await self.run_on_engine(fn)]

    async def end_requests(self, pick: Callable[[Engine], list[str]]) -> list[str]:
        """End now, between steps, the requests `pick(engine)` names (finish reason "abort"); each
        client gets its last update, as if the request had finished. Returns their ids."""

        def end(engine: Engine) -> list[str]:
            ids = pick(engine)
            seqs = [seq for rid in ids if rid in self._requests for seq in self._requests[rid].seqs]
            for rid in ids:
                engine.abort(rid)
            self._publish(seqs)
            for rid in ids:  # a request whose other samples had not started yet
                if rid in self._requests:
                    self._abort(rid)
                    self._send(rid, JaxrsError(f"request {rid} was ended before it finished"))
            return ids

        return await self.run_on_engine(end)

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight are aborted and their callers told."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        while not self._commands.empty():  # a re-ISQ the thread never reached
            command = self._commands.get_nowait()
            if command[0] in ("requantize", "call"):
                _settle(command[2], command[3], JaxrsError("the server is shutting down"))
        for request_id, request in list(self._requests.items()):
            self.engine.abort(request_id)
            self._forget(request)
        for request_id in list(self._sinks):
            self._send(request_id, JaxrsError("the server is shutting down"))

    # -- engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                touched = self.engine.step()
            except Exception as e:  # a failed step must not leave clients hanging
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self.stats.steps += 1
            self._publish(touched)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params, cache_key, images, cache_salt = command
                if request_id not in self._sinks:  # the client left before admission
                    self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1
                    continue
                try:
                    self._requests[request_id] = self.engine.add_request(
                        prompt_ids, params, request_id, cache_key, images, cache_salt
                    )
                    self.stats.prompt_tokens += len(prompt_ids)
                except JaxrsError as e:
                    self._send(request_id, e)
            elif command[0] == "requantize":
                self._requantize(*command[1:])
            elif command[0] == "call":
                _, fn, loop, done = command
                try:
                    _settle(loop, done, fn(self.engine))
                except Exception as e:  # the caller reports it
                    _settle(loop, done, e)
            else:
                self._abort(command[1])

    def _requantize(self, fmt: str, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            result = self.engine.requantize(fmt)
        except Exception as e:  # the caller reports it; the engine serves on (old weights restored)
            _settle(loop, done, e)
            return
        self.stats.requantizations += 1
        self._publish(result.cut)
        _settle(loop, done, result)

    def _abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        self.engine.abort(request_id)
        self._forget(request)
        self._count_finish(request)

    def _publish(self, touched: list[Sequence]) -> None:
        by_request: dict[str, list[Sequence]] = {}
        for seq in touched:
            by_request.setdefault(seq.request_id, []).append(seq)
        now = time.monotonic()
        for request_id, seqs in by_request.items():
            request = self._requests.get(request_id)
            if request is None:
                continue
            updates = [self._update(seq, now) for seq in seqs]
            updates = [u for u in updates if u.text or u.token_ids or u.finish_reason]
            if not updates and not request.finished:
                continue
            update = RequestUpdate(
                request_id, seqs[0].prompt_ids, updates, seqs[0].num_cached_tokens, request.finished
            )
            if request.finished:  # counted before the client can see the end (and scrape /metrics)
                self._forget(request)
                self._count_finish(request)
            self._send(request_id, update)

    def _update(self, seq: Sequence, now: float) -> SequenceUpdate:
        key = (seq.request_id, seq.index)
        stream = self._streams.setdefault(key, _Stream())
        new_tokens = seq.output_ids[stream.tokens_sent :]
        if new_tokens:
            last = self._last_token_time.get(key)
            if last is None:
                self.stats.time_to_first_token.append(now - seq.arrival_time)
            else:
                self.stats.inter_token.append((now - last) / len(new_tokens))
            self._last_token_time[key] = now
            self.stats.generation_tokens += len(new_tokens)
        safe = stream_end(seq, stream.text_sent)
        text = seq.text[stream.text_sent : safe]
        logprobs = seq.logprobs[stream.tokens_sent :] if seq.params.logprobs is not None else []
        stream.text_sent, stream.tokens_sent = safe, len(seq.output_ids)
        if not seq.finished:
            return SequenceUpdate(seq.index, text, new_tokens, logprobs, None)
        return SequenceUpdate(seq.index, text, new_tokens, logprobs, seq.finish_reason, seq.stop_reason)

    def _forget(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        for seq in request.seqs:
            self._streams.pop((seq.request_id, seq.index), None)
            self._last_token_time.pop((seq.request_id, seq.index), None)

    def _count_finish(self, request: Request) -> None:
        for seq in request.seqs:
            reason = seq.finish_reason or "abort"
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if self.on_finish is not None:
            self.on_finish(request)

    def _send(self, request_id: str, item: object) -> None:
        target = self._sinks.get(request_id)
        if target is not None:
            loop, sink = target
            loop.call_soon_threadsafe(sink.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id, request in list(self._requests.items()):
            self.engine.abort(request_id)
            self._forget(request)
            self._send(request_id, JaxrsError(f"the engine failed: {error}"))


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, outcome: object) -> None:
    """Resolve an event-loop future from another thread (an exception outcome is raised to its awaiter)."""

    def settle() -> None:
        if future.done():  # the caller went away
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    loop.call_soon_threadsafe(settle)
