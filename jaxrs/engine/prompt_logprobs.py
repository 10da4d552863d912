"""vLLM's `prompt_logprobs`: each prompt token's log-probability and rank, with the likeliest tokens at
its position, from the engine's prompt scoring (the same pass completions' `echo` with `logprobs` runs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from jaxrs.engine.sequence import TokenLogprob

if TYPE_CHECKING:
    from jaxrs.engine.engine import Engine


@dataclasses.dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob: a token's log-probability, its rank (1: the likeliest) and its text."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[int, Logprob] | None]


def prompt_logprobs(
    engine: Engine, prompt_ids: list[int], top: int, lora: str | None = None
) -> PromptLogprobs:
    """None for the first token (nothing precedes it), then per token {token id: Logprob}: the prompt's
    own token first, then the `top` likeliest there (raises JaxrsError when the prompt cannot be scored)."""
    return from_scores(engine.prompt_logprobs(prompt_ids, max(top, 1), lora), top, engine.tokenizer.decode)


def from_scores(
    scores: Sequence[TokenLogprob], top: int, decode: Callable[[list[int]], str]
) -> PromptLogprobs:
    """`prompt_logprobs` of a prompt already scored (`Engine.prompt_logprobs` with at least max(top, 1)
    alternatives: their ranks come with them)."""
    out: PromptLogprobs = [None]
    for scored in scores:
        entry = {scored.token_id: Logprob(scored.logprob, scored.rank or 1, decode([scored.token_id]))}
        for rank, (token, value) in enumerate(scored.top[:top], 1):
            entry.setdefault(token, Logprob(value, rank, decode([token])))
        out.append(entry)
    return out
