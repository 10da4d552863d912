"""Which values in a JSON schema are schemas themselves, by keyword (Draft 2020-12, with the older
`definitions`, `dependencies` and list-form `items`).

Rewrites of a schema walk these and nothing else: `const`, `enum`, `default` and `examples` hold data,
and the keys of `properties` or `$defs` are names, so a property called "enum" or "minimum" is never
taken for a keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

# keyword -> how its value holds subschemas
ONE = {
    "items",
    "additionalItems",
    "additionalProperties",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
}
LISTS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}
MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}


def _is_schema(value: Any) -> bool:
    return isinstance(value, dict | bool)


def map_subschemas(schema: dict[str, Any], rewrite: Callable[[Any, str], Any]) -> dict[str, Any]:
    """A copy of `schema` with each immediate subschema replaced by `rewrite(subschema, keyword)`."""
    out = {}
    for key, value in schema.items():
        if key in ONE and _is_schema(value):
            value = rewrite(value, key)
        elif key in LISTS and isinstance(value, list):
            value = [rewrite(v, key) if _is_schema(v) else v for v in value]
        elif key in MAPS and isinstance(value, dict):
            value = {name: rewrite(v, key) if _is_schema(v) else v for name, v in value.items()}
        out[key] = value
    return out


def walk(schema: Any) -> Iterator[dict[str, Any]]:
    """Every schema object in `schema`, itself first (boolean schemas have nothing to visit)."""
    if not isinstance(schema, dict):
        return
    yield schema
    found: list[Any] = []
    map_subschemas(schema, lambda sub, _: found.append(sub))
    for sub in found:
        yield from walk(sub)
