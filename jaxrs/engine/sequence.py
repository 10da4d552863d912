"""One generated sequence as the engine tracks it (a request with n > 1 owns n of them)."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Hashable
from typing import Any

from jaxrs.engine.block_manager import BlockTable
from jaxrs.engine.sampling import SamplingParams
from jaxrs.structured.state import GrammarState
from jaxrs.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely alternatives, best first
    rank: int | None = None  # 1 + how many tokens were likelier (prompt scoring with alternatives)


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer
    cache_key: Hashable = None  # extra prefix-cache key (adapter, images)
    images: Any = None  # jaxrs.vision.prompt.ImagePrompt: the prompt's images and their features
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    table: BlockTable = dataclasses.field(default_factory=BlockTable)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it (not EOS)
    text: str = ""
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_token_time: float | None = None
    grammar: GrammarState | None = None  # a constrained sequence's matcher

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def needs_host_each_token(self) -> bool:
        """Penalties and bad words read the growing output, and a grammar's mask follows each token, so
        such a sequence decodes one token per call."""
        p = self.params
        return (
            p.repetition_penalty not in (None, 1.0)
            or bool(p.presence_penalty)
            or bool(p.frequency_penalty)
            or self.grammar is not None
            or p.bans_follow_output
        )
