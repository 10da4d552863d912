"""Submitting prompts to the AsyncEngine and gathering what comes back, for both endpoints.

Each prompt is its own engine request (with its n samples); a request for several prompts merges their
updates as they arrive. Leaving the merged iterator early, or being cancelled, aborts every engine
request still running, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator

from litestar import Request

from jaxrs.engine.async_engine import AsyncEngine, QueueFullError, RequestUpdate, SequenceUpdate
from jaxrs.engine.engine import Engine
from jaxrs.engine.prompt_logprobs import Logprob, from_scores
from jaxrs.engine.sampling import SamplingParams, truncated_prompt
from jaxrs.engine.sequence import TokenLogprob
from jaxrs.errors import JaxrsError
from server.errors import APIError
from server.sampling import param_of
from server.schemas import PromptLogprob, PromptTokensDetails, SamplingFields, Usage


def check_prompt(
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> None:
    """Reject, before anything is queued, a prompt the engine cannot serve with this many new tokens."""
    limit = engine.max_model_len
    total = len(prompt_ids) + params.max_tokens
    if total > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but {total} were requested "
            f"({len(prompt_ids)} in the prompt, {params.max_tokens} for the completion); "
            f"shorten the prompt or lower {param}",
            param=param,
            code="context_length_exceeded",
        )
    try:
        engine.validate(prompt_ids, params)
    except JaxrsError as e:  # a sampling field's id range, or else the prompt itself
        raise APIError(400, str(e), param=param_of(e) or prompt_param) from None


def truncated(engine: Engine, prompt_ids: list[int], keep: int | None) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the model's limit); a value
    below 1 (but -1) or above the context length is a 400."""
    if keep is not None and not (keep == -1 or 1 <= keep <= engine.max_model_len):
        raise APIError(
            400,
            f"truncate_prompt_tokens must be in [1, {engine.max_model_len}] or -1, not {keep}",
            param="truncate_prompt_tokens",
        )
    return truncated_prompt(prompt_ids, keep, engine.max_model_len)


async def score_prompts(
    driver: AsyncEngine, ids: list[list[int]], top: int, lora: str | None, param: str, what: str | None = None
) -> list[list[TokenLogprob]]:
    """Each prompt's tokens scored on the engine thread between steps (`Engine.prompt_logprobs`: the first
    token has none), with the `top` likeliest at each; a prompt that cannot be scored is a 400 naming
    `param`, the field that asked for the scores (its message starts with `what`, default `param`)."""
    out = []
    for prompt_ids in ids:
        try:
            out.append(
                await driver.run_on_engine(lambda engine, p=prompt_ids: engine.prompt_logprobs(p, top, lora))
            )
        except JaxrsError as e:
            raise APIError(400, f"{what or param}: {e}", param=param) from None
    return out


def check_stream_fields(req: SamplingFields) -> None:
    """vLLM's checks of the fields that depend on `stream`: `stream_options` only with `stream: true`, and
    no prompt_logprobs above 0 with it (its stream has nowhere to put them; 0 asks for nothing)."""
    if req.stream_options is not None and req.stream_options.given and not req.stream:
        raise APIError(400, "stream_options can only be given with stream: true", param="stream_options")
    if req.stream and req.prompt_logprobs:
        raise APIError(
            400,
            "prompt_logprobs are not available with stream: true (as in vLLM); ask without streaming",
            param="prompt_logprobs",
        )


def stream_usage(req: SamplingFields) -> tuple[bool, bool]:
    """vLLM's stream_options as read: a last chunk with the usage (`include_usage`), and with it each
    chunk's running usage of its choice (`continuous_usage_stats`, only beside `include_usage`)."""
    options = req.stream_options
    include = bool(options and options.include_usage)
    return include, include and bool(options and options.continuous_usage_stats)


def prompt_entries(
    engine: Engine, scores: list[list[TokenLogprob]], top: int
) -> list[list[dict[str, PromptLogprob] | None]]:
    """vLLM's prompt_logprobs of each scored prompt (`score_prompts` with at least max(top, 1)): None for
    the first token, then {token id: PromptLogprob} with the prompt's token and the `top` likeliest."""
    decode = engine.tokenizer.decode
    return [[_prompt_entry(e) for e in from_scores(s, top, decode)] for s in scores]


def _prompt_entry(entry: dict[int, Logprob] | None) -> dict[str, PromptLogprob] | None:
    if entry is None:
        return None
    return {str(t): PromptLogprob(lp.logprob, lp.rank, lp.decoded_token) for t, lp in entry.items()}


def check_capacity(driver: AsyncEngine, num_requests: int) -> None:
    if driver.num_waiting + num_requests > driver.max_waiting:
        raise APIError(429, f"too many requests waiting ({driver.num_waiting}); retry later")


async def generate_all(
    driver: AsyncEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    request_id: str,
    images: object = None,
    cache_salt: str | None = None,
) -> AsyncGenerator[tuple[int, RequestUpdate], None]:
    """Yield (prompt index, update) for every prompt's engine request until all have finished.
    `images`: the placed images of a single prompt (`jaxrs.vision.prompt.ImagePrompt`); `cache_salt`:
    vLLM's prefix-cache salt (blocks shared only with requests of the same salt)."""
    queue: asyncio.Queue[tuple[int, RequestUpdate | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        try:
            # text-only, unsalted calls keep the old shape
            extra = {"images": images} if images is not None else {}
            extra |= {"cache_salt": cache_salt} if cache_salt is not None else {}
            async for update in driver.generate(ids, params, request_id=rid, **extra):
                queue.put_nowait((i, update))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, QueueFullError):
                raise APIError(429, str(item)) from None
            elif isinstance(item, JaxrsError):  # validated already, so the engine itself failed
                raise APIError(500, str(item)) from None
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:  # cancelling a pump aborts its engine request
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(
    request: Request, updates: AsyncGenerator[tuple[int, RequestUpdate], None], choices: Choices
) -> None:
    """Gather a whole (non-streamed) response. A client that hangs up meanwhile aborts it, as leaving
    a stream does, rather than leaving the engine to finish work nobody will read (HTTP 499)."""

    async def gather() -> None:
        async with contextlib.aclosing(updates):
            async for prompt_index, update in updates:
                choices.apply(prompt_index, update)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.create_task(gather()), asyncio.create_task(hangup())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):  # cancelling `work` aborts the engine requests still running
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if not work.cancelled():
        work.result()  # its exception, if it failed
    else:
        raise APIError(499, "the client closed the connection before the response was ready")


@dataclasses.dataclass
class ChoiceState:
    """What one choice (a prompt's sample) has produced so far."""

    prompt_index: int
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Choices:
    """The choices of a request, indexed prompt * n + sample as OpenAI numbers them."""

    def __init__(self, num_prompts: int, n: int):
        self.n = n
        self.states = [ChoiceState(i // n) for i in range(num_prompts * n)]
        self.cached = [0] * num_prompts  # each prompt's tokens found in the prefix cache

    def apply(self, prompt_index: int, update: RequestUpdate) -> list[tuple[int, SequenceUpdate]]:
        """Record an update; returns (choice index, what it gained) for each choice it touched."""
        touched = []
        self.cached[prompt_index] = max(self.cached[prompt_index], update.num_cached_tokens)
        for u in update.updates:
            index = prompt_index * self.n + u.index
            state = self.states[index]
            state.text.append(u.text)
            state.token_ids += u.token_ids
            state.logprobs += u.logprobs
            state.finish_reason = u.finish_reason or state.finish_reason
            state.stop_reason = u.stop_reason if u.finish_reason else state.stop_reason
            touched.append((index, u))
        return touched

    def running_usage(self, index: int, prompt_tokens: int) -> Usage:
        """Choice `index`'s usage so far (vLLM's continuous usage: its prompt and its tokens)."""
        tokens = len(self.states[index].token_ids)
        return Usage(prompt_tokens, tokens, prompt_tokens + tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.states)

    def usage(self, prompt_tokens: int) -> Usage:
        """The response's usage: its prompt tokens (OpenAI's `prompt_tokens_details.cached_tokens`: how
        many of them the prefix cache held) and every choice's tokens."""
        tokens = self.completion_tokens
        details = PromptTokensDetails(sum(self.cached))
        return Usage(prompt_tokens, tokens, prompt_tokens + tokens, prompt_tokens_details=details)

    def finish_reasons(self) -> list[str]:
        """Per choice; "abort" for one that never finished (the client left)."""
        return [s.finish_reason or "abort" for s in self.states]
