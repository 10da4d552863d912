"""Structured output: grammars (JSON schema, regex, choice, Lark/GBNF) enforced on the sampler's token mask.

`Grammar` says what a request must produce; `GrammarCompiler` turns it into a matcher per sequence
(llguidance); `token_masks` packs the matchers' allowed tokens into the bitmask the jitted sampler takes.
"""

from jaxrs.structured.compiler import GrammarCompiler
from jaxrs.structured.grammar import Grammar

__all__ = ["Grammar", "GrammarCompiler"]
