"""JSON numbers with an end: schemas rewritten so every number has a bounded number of digits.

A JSON number may have any number of digits, and a model can keep writing them: Qwen2.5 answers
`{"temperature": 25.5555...` until max_tokens. llguidance's JSON options bound whitespace, not
digits, so the schema says it: a number without a `multipleOf` becomes a multiple of
10^-NUMBER_DECIMALS (at most that many decimals, no exponent), and a number or integer without a
bound on a side gets +-NUMBER_LIMIT there (at most 16 integer digits). What a schema states itself
(its own `multipleOf`, bounds, `enum`, `const`) is kept. Only constraints are added, so an output valid
for the rewritten schema is valid for the given one.
"""

from __future__ import annotations

from typing import Any

NUMBER_DECIMALS = 6
NUMBER_LIMIT = 1e15
# Keywords whose values are data, not schemas: never rewritten.
DATA_KEYWORDS = {"const", "enum", "default", "examples"}


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()


def _bound(schema: dict[str, Any]) -> dict[str, Any]:
    """One schema's own number keywords (its subschemas are done by `bounded_numbers`)."""
    types = _types(schema)
    if not types & {"number", "integer"} or DATA_KEYWORDS & schema.keys():
        return schema
    out = dict(schema)
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = 10.0**-NUMBER_DECIMALS
    low = out.get("minimum", out.get("exclusiveMinimum"))
    high = out.get("maximum", out.get("exclusiveMaximum"))
    if low is None and (high is None or high > -NUMBER_LIMIT):
        out["minimum"] = -NUMBER_LIMIT
    if high is None and (low is None or low < NUMBER_LIMIT):
        out["maximum"] = NUMBER_LIMIT
    return out


def bounded_numbers(schema: Any) -> Any:
    """`schema` (a JSON schema, or any part of one) with every number and integer bounded."""
    if isinstance(schema, list):
        return [bounded_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    inner = {k: v if k in DATA_KEYWORDS else bounded_numbers(v) for k, v in schema.items()}
    return _bound(inner)


def any_json_object() -> dict[str, Any]:
    """A schema for any JSON object whose numbers are bounded (what `json_object` asks for)."""
    value = {
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            {"type": "number"},
            {"type": "string"},
            {"type": "array", "items": {"$ref": "#/$defs/value"}},
            {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
        ]
    }
    return bounded_numbers(
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}, "$defs": {"value": value}}
    )
