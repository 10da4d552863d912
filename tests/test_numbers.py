"""Bounded JSON numbers: the schema rewrite (what it adds, what it keeps), the matcher's view of it,
and a model that would write digits forever ending its answer."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest

from jaxrs import SamplingParams
from jaxrs.structured import Grammar, json_schemas
from jaxrs.structured.grammar import GrammarError
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
    own = {"type": ["number", "null"], "multipleOf": 0.5, "exclusiveMinimum": 0}  # as the next multiple
    assert bounded_numbers(own) == {
        "type": ["number", "null"],
        "multipleOf": 0.5,
        "minimum": 0.5,
        "maximum": NUMBER_LIMIT,
    }
    high = {"type": "number", "minimum": 1e16}  # the limit lies past what the document states
    assert bounded_numbers(high) == {**high, "multipleOf": 1e-6, "maximum": 1e17}
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
    monkeypatch.setattr(json_schemas, "bounded_numbers", lambda schema: schema)  # the schema as given
    raw = Grammar.json_schema({**POINT, "title": "unbounded"})  # not the cached grammar
    (loose,) = llm.generate(["point"], dataclasses.replace(params, grammar=raw), use_tqdm=False)
    assert loose.finish_reason == "length" and "55555555555555555555" in loose.text


def test_data_and_names_are_not_keywords_and_annotations_do_not_stop_the_bounds():
    schema = {
        "type": "object",
        "properties": {
            "default": {"type": "number"},
            "enum": {"type": "integer"},
            "n": {"type": "number", "default": 1, "examples": [2.5], "title": "N"},
        },
    }
    out = bounded_numbers(schema)["properties"]
    assert out["default"]["maximum"] == out["enum"]["maximum"] == out["n"]["maximum"] == NUMBER_LIMIT
    assert out["n"]["multipleOf"] == 1e-6 and out["n"]["default"] == 1


@pytest.mark.parametrize(
    "schema, inside, outside",
    [
        # bounds added to one part meet what another part, a $ref's target or a sibling states
        ({"allOf": [{"type": "number"}, {"maximum": -2e15}]}, "-3000000000000000", "0"),
        ({"$defs": {"n": {"type": "number"}}, "$ref": "#/$defs/n", "minimum": 2e15}, "2500000000000000", "1"),
        ({"type": ["integer", "null"], "minimum": 1e16}, "20000000000000000", "1"),
        # bounds finer than the default step, or exclusive ones a step apart
        ({"type": "number", "minimum": 1e-7, "maximum": 9e-7}, "0.0000005", "0.000001"),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e-6}, "0.0000005", "0"),
        ({"type": "number", "minimum": 0.12345678, "maximum": 0.12345679}, "0.123456785", "0.123456"),
        # llguidance lets 0 through an exclusive 0 below 1, and misses [0.5, 0.5] in steps of 0.25
        ({"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}, "0.25", "0"),
        ({"type": "number", "minimum": -0.5, "exclusiveMaximum": 0}, "-0.25", "-0"),
        (
            {"type": "number", "exclusiveMinimum": 0.33, "exclusiveMaximum": 0.7, "multipleOf": 0.25},
            "0.5",
            "0.75",
        ),
        # Draft 4's exclusive flags
        ({"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 0.5}, "0.25", "0"),
        ({"type": "number", "maximum": 2, "exclusiveMaximum": True}, "1.5", "2"),
    ],
)
def test_the_bounds_keep_the_schemas_meaning(llm, schema, inside, outside):
    grammar = Grammar.json_schema(schema)
    assert accepts(llm, grammar, inside) and not accepts(llm, grammar, outside)


def test_integers_past_64_bits_are_refused(llm):
    """llguidance's integers are 64-bit: it would write 2**63 - 1 for [1e19, 2e19]."""
    with pytest.raises(GrammarError, match="integer bounds"):
        llm.engine.grammars.compile(
            Grammar.json_schema({"type": "integer", "minimum": 1e19, "maximum": 2e19})
        )
