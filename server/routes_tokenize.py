"""POST /tokenize and /detokenize, vLLM's: a prompt (or chat messages through the template) to the token
ids the generation routes would feed, and token ids back to text."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post

from server.body import read_json
from server.context import ServerContext
from server.errors import APIError
from server.routes_chat import chat_prompt, conversation
from server.schemas import ChatMessage
from server.tools import tool_plan


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's two forms: `prompt` (special tokens added by default, as /v1/completions adds them) or
    `messages` rendered by the chat template (which writes its own, so none are added by default)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    tools: list[dict] | None = None


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


def _rendered(ctx: ServerContext, req: TokenizeRequest) -> tuple[str, Any]:
    """The text to tokenize and the tokenizer for it."""
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "tokenize takes either prompt or messages", param="prompt")
    if req.prompt is not None:
        return req.prompt, ctx.llm.tokenizer
    messages, images = conversation(req.messages or [])
    if images:
        raise APIError(400, "tokenize does not take images", param="messages")
    plan = tool_plan(ctx.chat_tokenizer, req.tools, None, None, ctx.tool_call_parser)
    return chat_prompt(ctx, req, messages, plan), ctx.chat_tokenizer  # type: ignore[arg-type]


@post("/tokenize", status_code=200)
async def tokenize(request: Request, ctx: ServerContext) -> TokenizeResponse:
    req = await read_json(request, TokenizeRequest)
    ctx.check_model(req.model)
    text, tokenizer = _rendered(ctx, req)
    special = req.prompt is not None if req.add_special_tokens is None else req.add_special_tokens
    ids = tokenizer.encode(text, add_special_tokens=special)
    strs = [tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(len(ids), ctx.llm.engine.max_model_len, ids, strs)


@post("/detokenize", status_code=200)
async def detokenize(request: Request, ctx: ServerContext) -> DetokenizeResponse:
    req = await read_json(request, DetokenizeRequest)
    ctx.check_model(req.model)
    vocab = ctx.llm.engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids must be in [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(ctx.llm.tokenizer.decode(req.tokens))
