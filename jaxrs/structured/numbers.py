"""JSON numbers with an end: schemas rewritten so every number has a bounded number of digits.

A JSON number may have any number of digits, and a model can keep writing them: Qwen2.5 answers
`{"temperature": 25.5555...` until max_tokens. llguidance's JSON options bound whitespace, not
digits, so the schema says it: a number without a `multipleOf` becomes a multiple of a step (at most
NUMBER_DECIMALS decimals, no exponent), and a number or integer without a bound on a side gets one
there (+-NUMBER_LIMIT: at most 16 integer digits). What a schema states itself (its own `multipleOf`,
bounds, `enum`, `const`) is kept.

Only constraints are added, so an output valid for the rewritten schema is valid for the given one;
and the added ones are chosen from the whole document so they never narrow it to nothing: a schema's
parts are joined by `allOf`, `$ref` and sibling keywords, so a bound added to one part meets what the
others state. The limit lies past every number the document states (ten times the largest), and the
step is finer than every decimal it states (one more place), so every interval a schema states holds
multiples of the step inside it.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from jaxrs.structured.grammar import GrammarError
from jaxrs.structured.subschemas import map_subschemas, walk

NUMBER_DECIMALS = 6
NUMBER_LIMIT = 1e15
MAX_DECIMALS = 10  # llguidance takes a `multipleOf` down to 1e-10
WIDEST_LIMIT = 1e18  # llguidance's number ranges end near 2**63
INT64 = (-(2**63), 2**63 - 1)  # llguidance's integers
LOWER, UPPER = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")


@dataclasses.dataclass(frozen=True)
class Scale:
    """What a document's numbers get where they leave it open: a bound on each open side and a step
    for a number without `multipleOf` (None: nothing is added, the document's numbers being past what
    llguidance can count)."""

    limit: float | None
    step: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _data_numbers(value: Any) -> list[float]:
    if _is_number(value):
        return [value]
    if isinstance(value, list):
        return [n for v in value for n in _data_numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _data_numbers(v)]
    return []


def _decimals(value: float) -> int:
    exponent = Decimal(repr(value)).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def scale_of(schema: Any) -> Scale:
    """The limit and step for `schema`, from every number it states (bounds, `multipleOf`, and the
    numbers in `const` and `enum`)."""
    stated: list[float] = []
    for s in walk(schema):
        stated += [s[k] for k in (*LOWER, *UPPER, "multipleOf") if _is_number(s.get(k))]
        stated += _data_numbers([s.get("const"), s.get("enum")])
    largest = max((abs(v) for v in stated if math.isfinite(v)), default=0)
    limit = NUMBER_LIMIT
    if largest > NUMBER_LIMIT:
        limit = 10.0 ** (math.ceil(math.log10(largest)) + 1)
    decimals = max((_decimals(v) for v in stated if math.isfinite(v)), default=0)
    places = NUMBER_DECIMALS if decimals < NUMBER_DECIMALS else decimals + 1
    return Scale(
        limit if limit <= WIDEST_LIMIT else None, float(f"1e-{places}") if places <= MAX_DECIMALS else None
    )


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()


def _exclusive_flags(schema: dict[str, Any]) -> dict[str, Any]:
    """Draft 4's `exclusiveMinimum: true` (a flag on `minimum`) in today's form, so the bound is made
    inclusive below like any other exclusive one."""
    if not any(isinstance(schema.get(k), bool) for k in (LOWER[1], UPPER[1])):
        return schema
    out = dict(schema)
    for bound, flag in (LOWER, UPPER):
        if isinstance(out.get(flag), bool) and out.pop(flag) and bound in out:
            out[flag] = out.pop(bound)
    return out


def _side(schema: dict[str, Any], keys: tuple[str, str]) -> float | None:
    values = [schema[k] for k in keys if _is_number(schema.get(k))]
    return None if not values else max(values) if keys == LOWER else min(values)


def _bound(schema: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """One schema's own number keywords (its subschemas are done by `bounded_numbers`)."""
    schema = _exclusive_flags(schema)
    types = _types(schema)
    if not types & {"number", "integer"} or "const" in schema or "enum" in schema:
        return schema
    low, high = _side(schema, LOWER), _side(schema, UPPER)
    past_int64 = (low is not None and low > INT64[1]) or (high is not None and high < INT64[0])
    if "integer" in types and past_int64:
        raise GrammarError(f"integer bounds past {INT64[0]}..{INT64[1]} are not supported")
    out = dict(schema)
    if "number" in types and "multipleOf" not in out and scale.step is not None:
        out["multipleOf"] = scale.step
    if scale.limit is not None:
        if low is None:
            out["minimum"] = -scale.limit
        if high is None:
            out["maximum"] = scale.limit
    if "number" in types and _is_number(out.get("multipleOf")) and out["multipleOf"] > 0:
        out = _inclusive(out)
    one = _is_number(out.get("minimum")) and out["minimum"] == out.get("maximum")
    return _one_value(out, types) if one and types <= {"number", "integer"} else out


def _one_value(schema: dict[str, Any], types: set[str]) -> dict[str, Any]:
    """A number held to one value as that `const` (llguidance misses some such ranges, [0.5, 0.5]
    in steps of 0.25 among them); a value its `multipleOf` or `integer` refuses keeps the range."""
    value, step = schema["minimum"], schema.get("multipleOf")
    whole = float(value).is_integer()
    if (step is not None and Decimal(repr(value)) % Decimal(repr(step)) != 0) or (
        types == {"integer"} and not whole
    ):
        return schema
    return {k: v for k, v in schema.items() if k not in ("minimum", "maximum", "multipleOf")} | {
        "const": int(value) if whole else value
    }


def _inclusive(schema: dict[str, Any]) -> dict[str, Any]:
    """A number's exclusive bounds as the nearest multiples of its `multipleOf` inside them, the same
    set of values: llguidance lets `0` through `exclusiveMinimum: 0` below 1 (and `-0` through
    `exclusiveMaximum: 0`)."""
    out = dict(schema)
    step = Decimal(repr(out["multipleOf"]))
    for (bound, flag), rounding, pick in ((LOWER, ROUND_FLOOR, max), (UPPER, ROUND_CEILING, min)):
        if not _is_number(out.get(flag)):
            continue
        edge = Decimal(repr(out.pop(flag)))
        inside = (edge / step).to_integral_value(rounding) + (1 if bound == "minimum" else -1)
        value = float(inside * step)
        out[bound] = pick(out[bound], value) if _is_number(out.get(bound)) else value
    return out


def bounded_numbers(schema: Any) -> Any:
    """`schema` (a JSON schema document) with every number and integer bounded."""
    scale = scale_of(schema)

    def bound(sub: Any, keyword: str = "") -> Any:
        return _bound(map_subschemas(sub, bound), scale) if isinstance(sub, dict) else sub

    return bound(schema)


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
