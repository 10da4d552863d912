"""Grammars -> llguidance matchers over one model's vocabulary, and the packed masks they allow.

llguidance (Rust, no dependencies) was chosen over xgrammar: it compiles a schema in 1-16 ms against
19-31 ms, takes Lark grammars (mistral.rs's `lark` type) and GBNF, and needs no torch at run time;
its masks cost 0.02-0.05 ms a token, against a decode step of tens of milliseconds (README,
"Structured output"). The vocabulary wrapper costs about a second for a 150k vocabulary, so it is built
on the first constrained request and kept.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np

from jaxrs.structured.grammar import Grammar, GrammarError
from jaxrs.structured.json_schemas import prepared_schema
from jaxrs.structured.numbers import any_json_object
from jaxrs.structured.regexes import ascii_classes
from jaxrs.tokenizer import Tokenizer

MAX_CACHED_GRAMMARS = 256  # compiled grammar texts kept, by their source
# JSON as `json.dumps` writes it (", " and ": ", no other whitespace): models write it so, and a row
# that may put whitespace anywhere can spend its whole budget on it. A schema's "x-guidance" overrides.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z][\w-]*\s*::=")


def grammar_text(grammar: Grammar) -> str:
    """The llguidance grammar (its JSON "top-level grammar" text) for `grammar`; JSON schemas are
    prepared for it (`jaxrs.structured.json_schemas`: numbers get a bounded number of digits)."""
    kind, value = grammar.kind, grammar.value
    try:
        if kind in ("json_schema", "json_object"):
            schema = prepared_schema(value) if kind == "json_schema" else any_json_object()
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(list(value)))
        if kind == "regex":
            value = ascii_classes(value)
        if kind == "grammar":  # GBNF defines its rules with "::="; anything else is Lark
            kind = "gbnf" if GBNF_RULE.search(value) else "lark"
        return llguidance.grammar_from(kind, value)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid {kind}: {e}") from None
    except RecursionError:
        raise GrammarError(f"invalid {kind}: nested too deeply") from None


class GrammarCompiler:
    """Compiles grammars against a model's vocabulary and makes a fresh matcher per sequence.

    `vocab_size` is the logits' width (it may exceed the tokenizer's: those ids are never allowed).
    EOS, any of `eos_token_ids`, is allowed exactly when the grammar accepts what came so far.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.eos_token_ids[0]
        self.lexicon = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self._texts: OrderedDict[Grammar, str] = OrderedDict()
        self._lock = threading.Lock()  # requests are validated on the server's thread, masks on the engine's

    def compile(self, grammar: Grammar) -> str:
        """The validated grammar text; raises GrammarError naming what is wrong."""
        with self._lock:
            if grammar in self._texts:
                self._texts.move_to_end(grammar)
                return self._texts[grammar]
        text = grammar_text(grammar)
        probe = llguidance.LLMatcher(self.lexicon, text)
        if probe.is_error():
            raise GrammarError(f"invalid {grammar.kind}: {probe.get_error().strip()}")
        with self._lock:
            self._texts[grammar] = text
            while len(self._texts) > MAX_CACHED_GRAMMARS:
                self._texts.popitem(last=False)
        return text

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher at the start of `grammar` (one per sequence: it holds that sequence's progress)."""
        return llguidance.LLMatcher(self.lexicon, self.compile(grammar))

    def fill(self, rows: Sequence[tuple[llguidance.LLMatcher, int]], masks: np.ndarray) -> None:
        """Write each (matcher, row)'s allowed tokens into `masks` [B, words] int32, in parallel, with
        the EOS rule applied."""
        if not rows:
            return
        llnp.fill_next_token_bitmask_par(self.executor, list(rows), masks)
        words, bits = np.divmod(np.asarray(self.eos_token_ids, np.int64), 32)
        eos_bits = np.left_shift(np.int64(1), bits).astype(np.uint32).view(np.int32)
        for matcher, row in rows:
            if matcher.is_accepting() or matcher.is_error():
                masks[row, words] |= eos_bits
            else:
                masks[row, words] &= ~eos_bits


def advance(matcher: llguidance.LLMatcher, token: int) -> None:
    """Feed a sampled token to its sequence's matcher (a token the mask allowed always fits; one that
    does not leaves the matcher in error, whose mask then allows only EOS)."""
    if not matcher.is_stopped():
        matcher.consume_token(token)
