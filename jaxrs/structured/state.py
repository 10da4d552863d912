"""A constrained sequence's grammar progress, and the batch masks built from many of them."""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np

from jaxrs.structured.compiler import GrammarCompiler, advance
from jaxrs.structured.grammar import Grammar
from jaxrs.structured.mask import all_allowed


class GrammarState:
    """One sequence's matcher: where in its grammar the tokens so far have led. Dropped (and the
    matcher freed) when the sequence finishes."""

    def __init__(self, compiler: GrammarCompiler, grammar: Grammar):
        self.compiler = compiler
        self.matcher: llguidance.LLMatcher = compiler.matcher(grammar)

    def advance(self, token: int) -> None:
        advance(self.matcher, token)

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


def token_masks(states: Sequence[GrammarState | None], rows: int, vocab_size: int) -> np.ndarray:
    """The [rows, words] packed mask of a batch: row i from `states[i]`'s grammar, all ones for free
    rows and padding."""
    masks = all_allowed(rows, vocab_size)
    fill_token_masks(states, masks)
    return masks


def fill_token_masks(states: Sequence[GrammarState | None], masks: np.ndarray) -> None:
    """Overwrite row i of `masks` with `states[i]`'s allowed tokens (rows without a state are left)."""
    constrained = [(s, i) for i, s in enumerate(states) if s is not None]
    if constrained:
        compiler = constrained[0][0].compiler  # one engine, one compiler
        compiler.fill([(s.matcher, i) for s, i in constrained], masks)
