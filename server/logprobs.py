"""Engine logprobs -> the two OpenAI shapes: chat's per-token objects and the legacy completions one."""

from __future__ import annotations

from collections.abc import Sequence

from jaxrs.engine.sequence import TokenLogprob
from jaxrs.tokenizer import Tokenizer
from server.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text (a piece of a multi-byte character comes out as U+FFFD)."""
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(tokenizer, token_id)
        return TopLogprob(text, logprob, list(text.encode()))

    content = []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        content.append(
            ChatTokenLogprob(text, lp.logprob, list(text.encode()), [top(t, v) for t, v in lp.top])
        )
    return ChatLogprobs(content)


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob], *, top: int, offset: int
) -> tuple[CompletionLogprobs, int]:
    """The legacy object for these tokens, their text offsets counted from `offset`; returns the
    offset after the last token too, so a stream can continue from it. Each token's `top_logprobs`
    holds the `top` likeliest tokens and the token itself (up to `top` + 1 entries, as OpenAI and
    vLLM answer; `logprobs: 0` gives the token alone)."""
    out = CompletionLogprobs([], [], [], [])
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        alternatives = {token_text(tokenizer, t): v for t, v in lp.top[:top]}
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        alternatives.setdefault(text, lp.logprob)
        out.top_logprobs.append(alternatives)
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset
