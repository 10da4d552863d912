"""POST /v1/chat/completions: messages through the chat template, streamed or whole."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request, Response, post
from msgspec import UNSET

from jaxrs.chat_template import extra_template_variables
from jaxrs.engine.async_engine import RequestUpdate
from jaxrs.engine.sampling import MAX_LOGPROBS, SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.structured import Grammar
from jaxrs.structured.tool_calls import ToolCallStream
from jaxrs.structured.tools import (
    ToolError,
    ToolPlan,
    answer_calls,
    call_finish_reason,
    template_message,
    tool_conversation,
    tool_params,
)
from jaxrs.vision.chat import IMAGE_PART, joined, text_part
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
from server.images import image_marker, load_request_images, place_request_images, template_messages
from server.logprobs import chat_logprobs
from server.request_log import RequestRecord
from server.sampling import sampling_params
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Delta,
    ImageURL,
    Usage,
)
from server.streaming import DONE, event_stream, sse
from server.structured import request_grammar
from server.tools import tool_plan
from server.xlora import xlora_scalings

ROUTE = "/v1/chat/completions"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_IMAGE_PARTS = {"image_url", "input_image", "image"}


def _tool_fields(i: int, m: ChatMessage, call_ids: set[str]) -> dict[str, Any]:
    """An assistant's `tool_calls` (their ids remembered) or a tool result's `tool_call_id` (which must
    answer one of them), as the template reads them."""
    if m.role == "tool":
        if m.tool_call_id is None or m.tool_call_id not in call_ids:
            raise APIError(
                400,
                f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no earlier assistant tool call",
                param=f"messages[{i}].tool_call_id",
            )
        return {"tool_call_id": m.tool_call_id}
    if m.tool_calls and m.role == "assistant":
        for j, call in enumerate(m.tool_calls):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise APIError(
                    400,
                    f"messages[{i}].tool_calls[{j}] needs a function with a name",
                    param=f"messages[{i}].tool_calls[{j}]",
                )
            if "id" in call:
                call_ids.add(call["id"])
        return template_message({"tool_calls": m.tool_calls})
    return {}


_DETAILS = ("auto", "low", "high")


def _check_detail(image_url: ImageURL | str | None, param: str) -> None:
    """OpenAI's `image_url.detail` is "auto", "low" or "high" (a model here sees each image at its own
    processor's size whatever it says); anything else is a 400, as OpenAI and vLLM refuse it."""
    detail = image_url.detail if isinstance(image_url, ImageURL) else None
    if detail is not None and detail not in _DETAILS:
        raise APIError(400, f"{param} must be 'auto', 'low' or 'high', not {detail!r}", param=param)


def conversation(
    messages: list[ChatMessage], marker: str | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages as the chat template expects them (content parts as `jaxrs.vision.chat.split_images`
    writes them, which `template_messages` hands to the template as it reads them; assistant tool calls
    and tool results kept), and the image URLs in order, each with its place (`messages[i].content[j]`);
    a text-only model (`marker` None) refuses image parts."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out, images = [], []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported (system, user, assistant, tool)",
                param=f"messages[{i}].role",
            )
        extra = _tool_fields(i, m, call_ids)
        if m.content is None and "tool_calls" in extra:
            out.append({"role": role, "content": None, **extra})
            continue
        if m.content is None:
            raise APIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
        if isinstance(m.content, str):
            content: str | list = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                if part.type in _IMAGE_PARTS and marker is None:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}] is an image; this model is text-only",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_content",
                    )
                if part.type in _IMAGE_PARTS:
                    _check_detail(part.image_url, f"messages[{i}].content[{j}].image_url.detail")
                    url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                    if not url:
                        raise APIError(
                            400,
                            f"messages[{i}].content[{j}] has no image_url.url",
                            param=f"messages[{i}].content[{j}]",
                        )
                    parts.append(IMAGE_PART)
                    images.append((url, f"messages[{i}].content[{j}]"))
                    continue
                if part.type != "text":
                    accepted = "'text' parts are" if marker is None else "'text' and 'image_url' parts are"
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}] has type {part.type!r}; only {accepted} accepted",
                        param=f"messages[{i}].content[{j}].type",
                    )
                parts.append(text_part(part.text or ""))
            content = joined(parts, marker) if role == "tool" else parts
        out.append({"role": role, "content": content, **extra})
    return out, images


def prompt_text(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The rendered conversation (the template writes its own BOS), with vLLM's template options:
    `add_generation_prompt`, `continue_final_message` (the final message left open, to be
    continued) and `chat_template_kwargs` (more template variables)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(
            400,
            "continue_final_message needs add_generation_prompt: false",
            param="continue_final_message",
        )
    try:
        variables = extra_template_variables(req.chat_template_kwargs)
    except JaxrsError as e:
        raise APIError(400, str(e), param="chat_template_kwargs") from None
    try:
        return ctx.chat_tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt,
            tools=tools,
            continue_final_message=req.continue_final_message,
            **variables,
        )
    except JaxrsError as e:
        raise APIError(400, str(e), param="messages") from None


def chat_params(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    ids: list[int],
    plan: ToolPlan | None = None,
    grammar: Grammar | None = None,
) -> SamplingParams:
    """max_completion_tokens wins over max_tokens; neither means "up to the context length". A forced
    tool call's grammar and an output constraint (`grammar`, `request_grammar`'s) cannot both apply."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1", param=param)
    if max_tokens is None:
        max_tokens = max(1, ctx.llm.engine.max_model_len - len(ids))
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar)
    try:
        params = tool_params(plan, params)
        if plan is not None and plan.grammar is not None:
            ctx.llm.engine.grammars.compile(plan.grammar)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
    except JaxrsError as e:
        raise APIError(400, f"tools: {e}", param="tools") from None
    check_prompt(ctx.llm.engine, ids, params, param=param, prompt_param="messages")
    return params


def chat_prompt(
    ctx: ServerContext, req: ChatCompletionRequest, messages: list[dict[str, Any]], plan: ToolPlan | None
) -> str:
    """The prompt a conversation and its tool plan render to: the text the chat route feeds and
    /tokenize counts (the generic tool format rewrites the messages; typed-part templates get parts)."""
    rendered = template_messages(ctx, tool_conversation(ctx.chat_tokenizer, plan, messages))
    return prompt_text(ctx, req, rendered, plan.template_tools if plan else None)


@post(ROUTE.removeprefix("/v1"), status_code=200)
async def chat_completions(request: Request, ctx: ServerContext) -> Response:
    record = RequestRecord(new_id("chatcmpl"), ROUTE)
    choices: Choices | None = None
    try:
        req = await read_json(request, ChatCompletionRequest)
        check_stream_fields(req)
        record.model, record.stream = ctx.check_model(req.model), req.stream
        messages, sources = conversation(req.messages, image_marker(ctx))
        record.prompt = messages
        images = await load_request_images(ctx, sources)
        grammar = request_grammar(ctx.llm.engine, req)
        plan = tool_plan(
            ctx.chat_tokenizer,
            req.tools,
            req.tool_choice,
            req.parallel_tool_calls,
            ctx.tool_call_parser,
            grammar,
        )
        rendered = chat_prompt(ctx, req, messages, plan)
        ids, placed = place_request_images(ctx, rendered, images)
        if req.truncate_prompt_tokens is not None and placed is not None:
            raise APIError(
                400, "truncate_prompt_tokens cannot cut a prompt with images", param="truncate_prompt_tokens"
            )
        ids = truncated(ctx.llm.engine, ids, req.truncate_prompt_tokens)
        record.prompt_tokens = len(ids)
        params = ctx.with_adapter(chat_params(ctx, req, ids, plan, grammar), record.model)
        driver = ctx.ready_driver()
        check_capacity(driver, 1)
        if req.prompt_logprobs is not None and placed is not None:
            raise APIError(400, "prompt_logprobs cannot score a prompt with images", param="prompt_logprobs")
        scored = None
        if req.prompt_logprobs is not None and not req.stream:  # a stream takes only 0: nothing to send
            top = req.prompt_logprobs
            scores = await score_prompts(driver, [ids], max(top, 1), params.lora, "prompt_logprobs")
            scored = prompt_entries(ctx.llm.engine, scores, top)
        updates = generate_all(driver, [ids], params, record.id, images=placed, cache_salt=req.cache_salt)
        if req.stream:
            return event_stream(_stream(ctx, req, record, updates, plan))
        choices = Choices(1, req.n)
        await collect(request, updates, choices)
        ctx.log_request(record, choices)
        body = _completion(ctx, req, record, choices, plan)
        if scored:
            body.prompt_logprobs = scored[0]
        return Response(body)
    except Exception as e:
        ctx.log_failure(record, e, choices)
        raise


def assistant_message(
    text: str, finish_reason: str | None, plan: ToolPlan | None
) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a whole choice: its tool calls parsed out when the request has tools
    (finish_reason "tool_calls" then), the generic format's response out of its JSON."""
    content, calls, reason = answer_calls(plan, text, finish_reason)
    return AssistantMessage(content, tool_calls=UNSET if calls is None else calls), reason


def _completion(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    record: RequestRecord,
    choices: Choices,
    plan: ToolPlan | None = None,
) -> ChatCompletion:
    tokenizer = ctx.llm.tokenizer
    out = [
        ChatChoice(
            i,
            *assistant_message("".join(s.text), s.finish_reason, plan),
            chat_logprobs(tokenizer, s.logprobs) if req.logprobs else None,
            s.stop_reason,
        )
        for i, s in enumerate(choices.states)
    ]
    usage = choices.usage(record.prompt_tokens)
    completion = ChatCompletion(record.id, int(record.timestamp), record.model or ctx.served_name, out, usage)
    if req.xlora_scalings:
        completion.xlora_scalings = xlora_scalings(ctx, record.id, req.n)
    return completion


async def _stream(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    record: RequestRecord,
    updates: AsyncGenerator[tuple[int, RequestUpdate], None],
    plan: ToolPlan | None = None,
) -> AsyncGenerator[bytes, None]:
    """Role chunks, content (or tool-call) chunks, a finish chunk per choice, the usage chunk if asked,
    [DONE]."""
    include_usage, continuous = stream_usage(req)
    created, model = int(record.timestamp), record.model or ctx.served_name
    tokenizer = ctx.llm.tokenizer
    choices = Choices(1, req.n)
    calls = [ToolCallStream(plan.parser, plan.parallel) for _ in range(req.n)] if plan is not None else None

    def chunk(parts: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        if continuous and parts and usage is None:
            usage = choices.running_usage(parts[0].index, record.prompt_tokens)
        return sse(
            ChatCompletionChunk(record.id, created, model, parts, usage=usage if include_usage else UNSET)
        )

    try:
        async with contextlib.aclosing(updates):
            yield chunk([ChatChunkChoice(i, Delta(role="assistant", content="")) for i in range(req.n)])
            async for prompt_index, update in updates:
                for index, u in choices.apply(prompt_index, update):
                    logprobs = chat_logprobs(tokenizer, u.logprobs) if req.logprobs and u.logprobs else None
                    text, reason, tool_deltas = u.text, u.finish_reason, []
                    if calls is not None:
                        text, tool_deltas = calls[index].push(u.text, final=bool(u.finish_reason))
                        if reason and calls[index].called:
                            reason = call_finish_reason(plan, reason)
                    if text or logprobs:
                        yield chunk([ChatChunkChoice(index, Delta(content=text), logprobs=logprobs)])
                    for d in tool_deltas:
                        yield chunk([ChatChunkChoice(index, Delta(tool_calls=[_tool_delta(d)]))])
                    if reason:
                        ended = ChatChunkChoice(index, Delta(), reason, stop_reason=u.stop_reason)
                        yield chunk([ended])
        if include_usage:
            yield chunk([], choices.usage(record.prompt_tokens))
        yield DONE
    except Exception as e:
        record.status, record.error = getattr(e, "status", 500), str(e)
        raise
    finally:
        ctx.log_request(record, choices)


def _tool_delta(d: dict[str, Any]) -> dict[str, Any]:
    """A `ToolCallStream` delta in OpenAI's shape: the first carries id, type and name."""
    if "id" in d:
        function = {"name": d["name"], "arguments": d["arguments"]}
        return {"index": d["index"], "id": d["id"], "type": "function", "function": function}
    return {"index": d["index"], "function": {"arguments": d["arguments"]}}
