"""Dates and times that keep the calendar: the patterns agree with `datetime` day by day, and the
matcher refuses February 29 of a common year (llguidance's own `date` format takes it)."""

from __future__ import annotations

import datetime
import re

import pytest

from jaxrs.structured import Grammar
from jaxrs.structured.formats import PATTERNS, calendar_formats


def test_the_date_pattern_is_the_calendar():
    date = re.compile(PATTERNS["date"])
    years = [*range(1, 10000, 37), 4, 100, 400, 1900, 2000, 2023, 2024, 2100, 2400, 9999]
    for year in years:
        for month in range(1, 13):
            for day in range(1, 32):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    valid = datetime.date.fromisoformat(text) is not None
                except ValueError:
                    valid = False
                assert bool(date.fullmatch(text)) == valid, text
    assert not date.fullmatch("0000-01-01")


@pytest.mark.parametrize(
    "text, valid",
    [
        ("2024-02-29T23:59:60.123456+05:30", True),
        ("2023-12-31T00:00:00Z", True),
        ("2023-02-29T00:00:00Z", False),
        ("2023-01-01T24:00:00Z", False),
        ("2023-01-01T00:00:00+24:00", False),
    ],
)
def test_the_date_time_pattern(text, valid):
    assert bool(re.fullmatch(PATTERNS["date-time"], text)) == valid


def test_a_format_stays_where_the_schema_states_its_own_pattern():
    assert calendar_formats({"type": "string", "format": "date"}) == {
        "type": "string",
        "pattern": PATTERNS["date"],
    }
    own = {"type": "string", "format": "date", "pattern": "^2"}
    assert calendar_formats(own) == own
    assert calendar_formats({"format": "email"}) == {"format": "email"}


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


@pytest.mark.parametrize(
    "fmt, inside, outside",
    [("date", "2024-02-29", "2023-02-29"), ("date-time", "2000-02-29T01:02:03Z", "1900-02-29T01:02:03Z")],
)
def test_the_matcher_keeps_the_calendar(llm, fmt, inside, outside):
    grammar = Grammar.json_schema({"type": "string", "format": fmt})

    def accepts(text: str) -> bool:
        matcher = llm.engine.grammars.matcher(grammar)
        ids = llm.tokenizer.encode(f'"{text}"', add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(inside) and not accepts(outside)
