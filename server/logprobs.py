"""Engine logprobs -> the two OpenAI shapes: chat's per-token objects and the legacy completions one."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from jaxrs.engine.sequence import TokenLogprob
from jaxrs.loading.gguf_tokenizer import bytes_to_unicode
from jaxrs.tokenizer import Tokenizer
from server.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text (a piece of a multi-byte character comes out as U+FFFD)."""
    return tokenizer.decode([token_id])


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for, which OpenAI's `bytes` field carries so that the pieces of a
    character split across tokens join up: where the token's text is not whole (U+FFFD), a byte-level
    BPE piece read back through its byte alphabet, or a SentencePiece byte piece (`<0xE6>`)."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.id_to_token(token_id) or ""
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    alphabet = _byte_alphabet()
    if piece and all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece)
    return text.encode()


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token_text(tokenizer, token_id), logprob, list(token_bytes(tokenizer, token_id)))

    content = []
    for lp in logprobs:
        text, raw = token_text(tokenizer, lp.token_id), token_bytes(tokenizer, lp.token_id)
        content.append(ChatTokenLogprob(text, lp.logprob, list(raw), [top(t, v) for t, v in lp.top]))
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
