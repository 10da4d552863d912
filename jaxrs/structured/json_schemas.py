"""A JSON schema as a user brings it -> the schema llguidance compiles, with the same meaning.

Boolean schemas (`true` is any value; llguidance takes objects only), keywords that constrain nothing
(`uniqueItems: false`, or `true` where at most one item is allowed) dropped rather than refused,
patterns with ECMA-262's ASCII `\\d` and `\\w` (`jaxrs.structured.regexes`), dates and times that
keep the calendar (`jaxrs.structured.formats`), and numbers given an end (`jaxrs.structured.numbers`).
"""

from __future__ import annotations

from typing import Any

from jaxrs.structured.formats import calendar_formats
from jaxrs.structured.grammar import GrammarError
from jaxrs.structured.numbers import bounded_numbers
from jaxrs.structured.regexes import ascii_classes
from jaxrs.structured.subschemas import map_subschemas


def _vacuous_unique_items(schema: dict[str, Any]) -> bool:
    value = schema.get("uniqueItems")
    most = schema.get("maxItems")
    return value is False or (value is True and isinstance(most, int) and most <= 1)


def _as_meant(schema: Any, keyword: str = "") -> Any:
    """`schema` with its vacuous keywords dropped and its patterns read as ECMA-262 reads them."""
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, _as_meant)
    if _vacuous_unique_items(out):
        del out["uniqueItems"]
    if isinstance(out.get("pattern"), str):
        out["pattern"] = ascii_classes(out["pattern"])
    out = calendar_formats(out)
    if isinstance(out.get("patternProperties"), dict):
        out["patternProperties"] = {ascii_classes(k): v for k, v in out["patternProperties"].items()}
    return out


def prepared_schema(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """`schema` ready for llguidance; raises GrammarError for `false`, which nothing matches."""
    if schema is False:
        raise GrammarError("the schema false matches nothing")
    try:
        return bounded_numbers(_as_meant({} if schema is True else schema))
    except RecursionError:
        raise GrammarError("the schema is nested too deeply") from None
