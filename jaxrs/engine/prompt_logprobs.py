"""vLLM's `prompt_logprobs`: each prompt token's log-probability and rank, with the likeliest tokens at
its position, from the engine's prompt scoring (the same pass completions' `echo` with `logprobs` runs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

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
    decode = engine.tokenizer.decode
    out: PromptLogprobs = [None]
    for scored in engine.prompt_logprobs(prompt_ids, max(top, 1), lora):
        entry = {scored.token_id: Logprob(scored.logprob, scored.rank or 1, decode([scored.token_id]))}
        for rank, (token, value) in enumerate(scored.top[:top], 1):
            entry.setdefault(token, Logprob(value, rank, decode([token])))
        out.append(entry)
    return out
