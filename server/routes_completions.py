"""POST /v1/completions: raw prompts (text or token ids, one or many), streamed or whole."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from litestar import Request, Response, post
from msgspec import UNSET

from jaxrs.engine.async_engine import RequestUpdate, SequenceUpdate
from jaxrs.engine.sampling import SamplingParams
from server.body import read_json
from server.context import ServerContext, new_id
from server.errors import APIError
from server.generation import (
    Choices,
    check_capacity,
    check_prompt,
    check_stream_fields,
    collect,
    generate_all,
    prompt_entries,
    score_prompts,
    stream_usage,
    truncated,
)
from server.logprobs import completion_logprobs, token_text
from server.request_log import RequestRecord
from server.sampling import sampling_params
from server.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from server.streaming import DONE, event_stream, sse
from server.structured import request_grammar

ROUTE = "/v1/completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def prompts(ctx: ServerContext, prompt: str | list) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt: a string, a list of strings, a token-id list or a list of those."""
    tokenizer = ctx.llm.tokenizer
    if isinstance(prompt, str):
        return [(prompt, tokenizer.encode(prompt))]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [(p, tokenizer.encode(p)) for p in prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [(tokenizer.decode(_token_ids(ctx, prompt)), list(prompt))]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [(tokenizer.decode(_token_ids(ctx, p)), p) for p in prompt]
    raise APIError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
        param="prompt",
    )


def _token_ids(ctx: ServerContext, ids: list[int]) -> list[int]:
    """Token ids checked before they are decoded (the tokenizer overflows on negative or huge ones)."""
    vocab = ctx.llm.engine.vocab_size
    if not all(0 <= t < vocab for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return ids


def completion_params(ctx: ServerContext, req: CompletionRequest, ids: list[list[int]]) -> SamplingParams:
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported; use n", param="best_of")
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if req.echo and max_tokens == 0:  # the prompt alone comes back: the rest is checked as for one token
        max_tokens = 1
    grammar = request_grammar(ctx.llm.engine, req)
    params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, grammar=grammar)
    for prompt_ids in ids:
        check_prompt(ctx.llm.engine, prompt_ids, params)
    return params


@post(ROUTE.removeprefix("/v1"), status_code=200)
async def completions(request: Request, ctx: ServerContext) -> Response:
    record = RequestRecord(new_id("cmpl"), ROUTE)
    choices: Choices | None = None
    try:
        req = await read_json(request, CompletionRequest)
        check_stream_fields(req)
        record.model, record.stream = ctx.check_model(req.model), req.stream
        record.prompt = req.prompt
        texts, ids = zip(*prompts(ctx, req.prompt), strict=True)
        if req.truncate_prompt_tokens is not None:
            ids = tuple(truncated(ctx.llm.engine, p, req.truncate_prompt_tokens) for p in ids)
            texts = tuple(ctx.llm.tokenizer.decode(p) for p in ids)
        record.prompt_tokens = sum(len(p) for p in ids)
        params = ctx.with_adapter(completion_params(ctx, req, list(ids)), record.model)
        driver = ctx.ready_driver()
        check_capacity(driver, len(ids))
        scored, prompt_scores = await _scored_prompts(ctx, req, list(ids), params.lora)
        if req.echo and req.max_tokens == 0:  # scoring the prompt only, as evaluation harnesses do
            updates = _prompts_only(record.id, list(ids), req.n)
        else:
            updates = generate_all(driver, list(ids), params, record.id, cache_salt=req.cache_salt)
        echoes = [texts[i // req.n] if req.echo else "" for i in range(len(ids) * req.n)]
        echoed = [scored[i // req.n] for i in range(len(ids) * req.n)] if scored else None
        if req.stream:
            lens = [len(p) for p in ids]
            return event_stream(_stream(ctx, req, record, updates, echoes, lens, echoed))
        choices = Choices(len(ids), req.n)
        await collect(request, updates, choices)
        ctx.log_request(record, choices)
        body = _completion(ctx, req, record, choices, echoes, echoed)
        for i, choice in enumerate(body.choices if prompt_scores else []):
            choice.prompt_logprobs = prompt_scores[i // req.n]
        return Response(body)
    except Exception as e:
        ctx.log_failure(record, e, choices)
        raise


async def _prompts_only(
    request_id: str, ids: list[list[int]], n: int
) -> AsyncGenerator[tuple[int, RequestUpdate], None]:
    """The updates of `max_tokens: 0` with `echo`: every choice ends at once, with no tokens."""
    for index, prompt_ids in enumerate(ids):
        ended = [SequenceUpdate(j, "", [], [], "length") for j in range(n)]
        yield index, RequestUpdate(request_id, prompt_ids, ended, 0, True)


async def _scored_prompts(
    ctx: ServerContext, req: CompletionRequest, ids: list[list[int]], lora: str | None
) -> tuple[list[CompletionLogprobs] | None, list | None]:
    """The prompts scored once on the engine thread, for what the request asks: with `echo` and
    `logprobs`, each prompt's own tokens with their log-probabilities (the first token has none) and the
    `logprobs` likeliest tokens at each; with `prompt_logprobs`, vLLM's entries (`prompt_entries`)."""
    echo = req.logprobs if req.echo and req.logprobs is not None else None
    wanted = None if req.stream else req.prompt_logprobs  # a stream takes only 0, which asks for nothing
    if echo is None and wanted is None:
        return None, None
    top = echo if wanted is None else max(echo or 0, wanted, 1)
    asked = ("echo", "echo with logprobs") if echo is not None else ("prompt_logprobs", "prompt_logprobs")
    scores = await score_prompts(ctx.ready_driver(), ids, top, lora, *asked)
    echoed = None
    if echo is not None:
        tokenizer, echoed = ctx.llm.tokenizer, []
        for prompt_ids, scored in zip(ids, scores, strict=True):
            first = token_text(tokenizer, prompt_ids[0])  # prompts are never empty (`check_prompt`)
            rest, _ = completion_logprobs(tokenizer, scored, top=echo, offset=len(first))
            echoed.append(_joined(CompletionLogprobs([first], [None], [None], [0]), rest))
    entries = None if wanted is None else prompt_entries(ctx.llm.engine, scores, wanted)
    return echoed, entries


def _joined(first: CompletionLogprobs | None, then: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return then
    return CompletionLogprobs(
        first.tokens + then.tokens,
        first.token_logprobs + then.token_logprobs,
        first.top_logprobs + then.top_logprobs,
        first.text_offset + then.text_offset,
    )


def _completion(
    ctx: ServerContext,
    req: CompletionRequest,
    record: RequestRecord,
    choices: Choices,
    echoes: list[str],
    echoed: list[CompletionLogprobs] | None = None,
) -> Completion:
    out = []
    for i, s in enumerate(choices.states):
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = completion_logprobs(
                ctx.llm.tokenizer, s.logprobs, top=req.logprobs, offset=len(echoes[i])
            )
            logprobs = _joined(echoed[i] if echoed else None, logprobs)
        text = echoes[i] + "".join(s.text)
        out.append(CompletionChoice(i, text, s.finish_reason, logprobs, stop_reason=s.stop_reason))
    usage = choices.usage(record.prompt_tokens)
    return Completion(record.id, int(record.timestamp), record.model or ctx.served_name, out, usage=usage)


async def _stream(
    ctx: ServerContext,
    req: CompletionRequest,
    record: RequestRecord,
    updates: AsyncGenerator[tuple[int, RequestUpdate], None],
    echoes: list[str],
    prompt_lens: list[int],
    echoed: list[CompletionLogprobs] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Echoed prompts first, then text chunks, a finish chunk per choice, usage if asked, [DONE]."""
    include_usage, continuous = stream_usage(req)
    created, model = int(record.timestamp), record.model or ctx.served_name
    choices = Choices(len(echoes) // req.n, req.n)
    offsets = [len(e) for e in echoes]

    def chunk(parts: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        if continuous and parts and usage is None:
            index = parts[0].index
            usage = choices.running_usage(index, prompt_lens[index // req.n])
        return sse(Completion(record.id, created, model, parts, usage=usage if include_usage else UNSET))

    try:
        async with contextlib.aclosing(updates):
            for i, echo in enumerate(echoes):
                if echo:
                    yield chunk([CompletionChoice(i, echo, None, echoed[i] if echoed else None)])
            async for prompt_index, update in updates:
                for index, u in choices.apply(prompt_index, update):
                    logprobs = None
                    if req.logprobs is not None and u.logprobs:
                        logprobs, offsets[index] = completion_logprobs(
                            ctx.llm.tokenizer, u.logprobs, top=req.logprobs, offset=offsets[index]
                        )
                    if u.text or logprobs:
                        yield chunk([CompletionChoice(index, u.text, None, logprobs)])
                    if u.finish_reason:
                        ended = CompletionChoice(index, "", u.finish_reason, stop_reason=u.stop_reason)
                        yield chunk([ended])
        if include_usage:
            yield chunk([], choices.usage(record.prompt_tokens))
        yield DONE
    except Exception as e:
        record.status, record.error = getattr(e, "status", 500), str(e)
        raise
    finally:
        ctx.log_request(record, choices)
