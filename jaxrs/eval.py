"""Perplexity of a fixed text: one number that says how much a weight format costs a model's quality."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from jaxrs.errors import JaxrsError

if TYPE_CHECKING:
    from jaxrs.llm import LLM


def perplexity(llm: LLM, text: str, lora: str | None = None) -> float:
    """exp of the mean negative log-likelihood of `text`'s tokens under `llm` (teacher forcing), with
    the LoRA adapter `lora` (None: the base model).

    The text is tokenized as a prompt (BOS if the model adds one) and cut into windows of at most the
    engine's sequence length; each window's first token is context only, every later one is scored.
    Windows are independent, so the result depends only on the text, the model and its weights.
    """
    ids = llm.tokenizer.encode(text)
    window = llm.engine.max_model_len
    logprobs: list[float] = []
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) > 1:
            logprobs += llm.score([chunk[:1]], [chunk[1:]], lora=lora)[0]
    if not logprobs:
        raise JaxrsError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}")
    return math.exp(-sum(logprobs) / len(logprobs))
