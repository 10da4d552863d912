"""Bounded JSON numbers: the schema rewrite (what it adds, what it keeps), the matcher's view of it,
and a model that would write digits forever ending its answer."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest

from jaxrs import SamplingParams
from jaxrs.structured import Grammar, compiler
from jaxrs.structured.numbers import NUMBER_LIMIT, any_json_object, bounded_numbers

POINT = {
    "type": "object",
    "properties": {"x": {"type": "number"}, "n": {"type": "integer"}},
    "required": ["x", "n"],
    "additionalProperties": False,
}


def test_numbers_get_decimals_and_bounds_and_nothing_stated_is_lost():
    out = bounded_numbers(POINT)
    assert out["properties"]["x"] == {
        "type": "number",
        "multipleOf": 1e-6,
        "minimum": -NUMBER_LIMIT,
        "maximum": NUMBER_LIMIT,
    }
    assert out["properties"]["n"] == {"type": "integer", "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}
    assert POINT["properties"]["x"] == {"type": "number"}  # the given schema is not changed
    own = {"type": ["number", "null"], "multipleOf": 0.5, "exclusiveMinimum": 0}
    assert bounded_numbers(own) == {**own, "maximum": NUMBER_LIMIT}
    high = {"type": "number", "minimum": 1e16}  # a default bound would contradict it: none added
    assert bounded_numbers(high) == {**high, "multipleOf": 1e-6}
    data = {"const": {"type": "number"}, "enum": [{"type": "integer"}], "type": "object"}
    assert bounded_numbers(data) == data
    listed = {"type": "number", "enum": [1.23456789]}
    assert bounded_numbers(listed) == listed
    nested = bounded_numbers({"$defs": {"p": {"type": "number"}}, "anyOf": [{"type": "integer"}]})
    assert nested["$defs"]["p"]["multipleOf"] == 1e-6 and nested["anyOf"][0]["maximum"] == NUMBER_LIMIT


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


def accepts(llm, grammar: Grammar, text: str) -> bool:
    matcher = llm.engine.grammars.matcher(grammar)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.mark.parametrize("grammar", [Grammar.json_schema(POINT), Grammar.json_object()])
def test_the_matcher_takes_short_numbers_only(llm, grammar):
    assert accepts(llm, grammar, '{"x": -25.555555, "n": 3}')
    assert not accepts(llm, grammar, '{"x": 25.5555555, "n": 3}')  # a seventh decimal
    assert not accepts(llm, grammar, '{"x": 1e400, "n": 3}')
    assert not accepts(llm, grammar, '{"x": 1, "n": 12345678901234567}')
    if grammar.kind == "json_object":
        assert accepts(llm, grammar, '{"a": [1, {"b": "c"}, true, null, 2.5]}')
        jsonschema.validate({"a": [1, {"b": None}]}, any_json_object())


def test_a_model_that_loves_fives_still_closes_its_object(llm, monkeypatch):
    """Biased towards "5" (as Qwen2.5 writes 25.5555... ), the number stops at six decimals and the
    object closes; the same schema without the bound writes fives until max_tokens."""
    five = llm.tokenizer.encode("5", add_special_tokens=False)[0]
    params = SamplingParams(
        max_tokens=60, temperature=0.0, logit_bias={five: 30.0}, grammar=Grammar.json_schema(POINT)
    )
    (out,) = llm.generate(["point"], params, use_tqdm=False)
    assert out.finish_reason == "stop", out.text
    value = json.loads(out.text)
    jsonschema.validate(value, POINT)
    assert re.search(r'"x": 5{1,16}(\.5{1,6})?,', out.text), out.text
    monkeypatch.setattr(compiler, "bounded_numbers", lambda schema: schema)  # the schema as given
    raw = Grammar.json_schema({**POINT, "title": "unbounded"})  # not the cached grammar
    (loose,) = llm.generate(["point"], dataclasses.replace(params, grammar=raw), use_tqdm=False)
    assert loose.finish_reason == "length" and "55555555555555555555" in loose.text
