"""What a constrained request must produce, in the words the APIs use for it.

A `Grammar` is plain data (kind and value), so `SamplingParams` can carry it and compare it; turning it
into the grammar library's text happens once per request, in `GrammarCompiler`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxrs.errors import JaxrsError

# kind -> what `value` holds
KINDS = {
    "json_schema": "a JSON schema (a dict, or its JSON text)",
    "json_object": "nothing: any JSON object",
    "regex": "a regular expression (Rust regex syntax, no look-around)",
    "choice": "a list of strings, one of which is the whole output",
    "lark": "a Lark grammar (llguidance's dialect)",
    "grammar": "a Lark or GBNF (llama.cpp) grammar",
}


class GrammarError(JaxrsError):
    """A grammar, schema or regex that cannot be compiled; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A constraint on the whole output. Build it with the class methods or `Grammar(kind, value)`."""

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "json_schema" and isinstance(self.value, str):
            try:
                object.__setattr__(self, "value", json.loads(self.value))
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
        if self.kind == "json_schema" and not isinstance(self.value, dict | bool):
            raise GrammarError(f"a JSON schema must be an object, not {type(self.value).__name__}")
        if self.kind == "choice":
            if not isinstance(self.value, list | tuple) or not self.value:
                raise GrammarError("choice must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.value):
                raise GrammarError("choice must be a list of strings")
            object.__setattr__(self, "value", tuple(self.value))
        if self.kind in ("regex", "lark", "grammar") and (not isinstance(self.value, str) or not self.value):
            raise GrammarError(f"a {self.kind} must be a non-empty string")
        try:  # the identity, once: a schema nested past Python's recursion limit is refused here
            object.__setattr__(self, "_key", self.kind + ":" + json.dumps(self.value, sort_keys=True))
        except RecursionError:
            raise GrammarError(f"the {self.kind} is nested too deeply") from None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Grammar:
        return cls("choice", options)

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls("lark", text)

    def key(self) -> str:
        """A hashable identity (schemas are dicts): the kind and the value as canonical JSON."""
        return self._key

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grammar) and self.key() == other.key()
