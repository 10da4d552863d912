"""Validation of structured outputs with `jsonschema`, strict where its defaults are loose: the formats
it leaves unchecked without extra packages (date-time, time, uri, hostname, duration) are checked,
`multipleOf` is exact on the decimals as written (0.3 is a multiple of 0.1), and patterns take
`\\p{...}` classes (the `regex` package)."""

from __future__ import annotations

import datetime
import enum
import re
from fractions import Fraction
from typing import Any

import jsonschema
import pydantic
import regex
from jsonschema import ValidationError, validators

_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\"<>\\^`{|}]*")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_DURATION = re.compile(r"P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?")


class Color(enum.Enum):
    """A pydantic enum: its schema reaches the model's through `#/$defs/Color`."""

    red = "red"
    green = "green"


class Point(pydantic.BaseModel):
    x: float
    y: float = 0.0


FORMATS = jsonschema.FormatChecker()


def _clock(match: re.Match[str] | None) -> bool:
    return match is not None and int(match[1]) < 24 and int(match[2]) < 60 and int(match[3]) < 61


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    datetime.date.fromisoformat(value[:10])
    return _clock(_DATE_TIME.fullmatch(value))


@FORMATS.checks("time")
def _time(value: object) -> bool:
    return not isinstance(value, str) or _clock(_TIME.fullmatch(value))


@FORMATS.checks("uri")
def _uri(value: object) -> bool:
    return not isinstance(value, str) or _URI.fullmatch(value) is not None


@FORMATS.checks("hostname")
def _hostname(value: object) -> bool:
    return not isinstance(value, str) or _HOSTNAME.fullmatch(value) is not None


@FORMATS.checks("duration")
def _duration(value: object) -> bool:
    return not isinstance(value, str) or _DURATION.fullmatch(value) is not None


def _multiple_of(validator, step, instance, schema):
    if validator.is_type(instance, "number"):
        if (Fraction(repr(instance)) / Fraction(repr(step))).denominator != 1:
            yield ValidationError(f"{instance!r} is not a multiple of {step}")


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not regex.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _validator(base):
    return validators.extend(base, {"multipleOf": _multiple_of, "pattern": _pattern})


Strict = _validator(jsonschema.Draft202012Validator)
StrictDraft4 = _validator(jsonschema.Draft4Validator)


def schema_errors(instance: Any, schema: Any) -> list[str]:
    """What is wrong with `instance` under `schema` (Draft 4 where the schema says so)."""
    draft4 = isinstance(schema, dict) and "draft-04" in str(schema.get("$schema", ""))
    checker = (StrictDraft4 if draft4 else Strict)(schema, format_checker=FORMATS)
    return [e.message for e in checker.iter_errors(instance)]
