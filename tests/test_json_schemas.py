"""JSON schemas as users write them (OpenAI structured outputs, pydantic's `model_json_schema()`,
hand-written ones) on a tiny random model sampled at temperature 1 with several seeds, so the sampler
wanders the whole grammar: every finished output validates with `jsonschema` (formats and
`multipleOf` checked strictly), and what cannot be enforced is refused naming the keyword. Also the
preparation itself: boolean schemas, keywords that constrain nothing, schemas nested too deeply."""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest

from jaxrs import SamplingParams
from jaxrs.structured import Grammar
from jaxrs.structured.grammar import GrammarError
from jaxrs.structured.json_schemas import prepared_schema
from tests.schema_check import Color, Point, schema_errors


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10, description="the name")
    qty: int = pydantic.Field(ge=0, le=100)
    price: float = pydantic.Field(gt=0, lt=1000)
    color: Color
    kind: Literal["a", "b"]
    note: str | None = None
    where: Point | None = None
    tags: list[str] = pydantic.Field(default_factory=list, max_length=3)
    counts: dict[str, int] = {}
    points: list[Point] = []


class Tree(pydantic.BaseModel):
    value: int
    children: list[Tree] = pydantic.Field(default_factory=list, max_length=2)


class Cat(pydantic.BaseModel):
    pet_type: Literal["cat"]
    meows: int


class Dog(pydantic.BaseModel):
    pet_type: Literal["dog"]
    barks: float


class Owner(pydantic.BaseModel):
    pet: Cat | Dog = pydantic.Field(discriminator="pet_type")


class Codes(pydantic.BaseModel):
    code: str = pydantic.Field(pattern=r"^[A-Z]{3}-\d{2,4}$")
    ratio: float = pydantic.Field(ge=0, le=1, multiple_of=0.25)
    step: int = pydantic.Field(multiple_of=5, gt=-20, lt=20)
    pair: tuple[int, str]


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer", "minimum": 0, "maximum": 9}
    for _ in range(depth):
        schema = {
            "type": "object",
            "properties": {"n": schema},
            "required": ["n"],
            "additionalProperties": False,
        }
    return schema


def _object(**properties) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


# name -> schema; every output must validate
SUPPORTED = {
    "empty": {},
    "true": True,
    "bare object": {"type": "object", "maxProperties": 2},
    "ref and $defs": {
        "$defs": {"P": _object(a={"type": "integer"})},
        **_object(p={"$ref": "#/$defs/P"}, q={"$ref": "#/$defs/P"}),
    },
    "recursive ref to the root": _object(
        v={"type": "integer"}, next={"anyOf": [{"$ref": "#"}, {"type": "null"}]}
    ),
    "ref with sibling bounds": {
        "$defs": {"n": {"type": "number"}},
        **_object(a={"$ref": "#/$defs/n", "minimum": 2e15}),
    },
    "allOf objects": {"allOf": [_object(a={"type": "string", "maxLength": 4}), {"required": ["a"]}]},
    "allOf bound past the limit": {"allOf": [{"type": "number"}, {"maximum": -2e15}]},
    "anyOf scalars": {
        "anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "boolean"}]
    },
    "oneOf disjoint": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]},
    "type array with null": _object(
        s={"type": ["string", "null"], "maxLength": 3}, n={"type": ["number", "null"]}
    ),
    "nullable via anyOf": _object(a={"anyOf": [{"type": "integer"}, {"type": "null"}]}),
    "enum of mixed types": {"enum": [1, "a", None, True, 2.5, {"k": [1, 2]}, [1, "x"], 'é"\n']},
    "const object": {"const": {"a": [1, {"b": None}], "c": "d"}},
    "nested arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        "maxItems": 2,
    },
    "prefixItems, items false": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 3}, {"type": "boolean"}],
        "items": False,
    },
    "min and max items": {"type": "array", "items": {"enum": [0, 1, 2]}, "minItems": 2, "maxItems": 4},
    "uniqueItems false": {"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 3},
    "uniqueItems of one item": {
        "type": "array",
        "items": {"type": "integer"},
        "uniqueItems": True,
        "maxItems": 1,
    },
    "min and max length": _object(s={"type": "string", "minLength": 2, "maxLength": 4}),
    "pattern": {"type": "string", "pattern": "^[a-z]{1,8}-[0-9]{2}$"},
    "unicode pattern": {"type": "string", "pattern": "^\\p{L}{2,4}$"},
    "formats": _object(
        **{f: {"type": "string", "format": f} for f in ("date", "date-time", "time", "uuid", "ipv4")}
    ),
    "more formats": _object(
        **{f: {"type": "string", "format": f} for f in ("email", "uri", "hostname", "duration")}
    ),
    "integer bounds": {"type": "integer", "minimum": -5, "maximum": 5},
    "exclusive integer bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
    "exclusive number bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
    "fractional integer bounds": {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 3.5},
    "bounds finer than the step": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.000001},
    "one value": {"type": "number", "exclusiveMinimum": 0.33, "exclusiveMaximum": 0.7, "multipleOf": 0.25},
    "huge bound": {"type": "number", "minimum": 1e16},
    "multipleOf integer": {"type": "integer", "multipleOf": 7, "minimum": -50, "maximum": 50},
    "multipleOf fraction": {"type": "number", "multipleOf": 0.1, "minimum": -1, "maximum": 1},
    "draft 4 exclusive flag": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 0.5,
    },
    "additionalProperties schema": {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "maxProperties": 2,
    },
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^x_[a-z]{1,4}$": {"type": "number"}},
        "additionalProperties": False,
        "maxProperties": 2,
    },
    "required subset": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in "abcdef"},
        "required": ["b", "e"],
        "additionalProperties": False,
    },
    "names needing escapes": _object(
        **{'q"uote': {"type": "integer"}, "back\\slash": {"type": "boolean"}, "new\nline": {"type": "null"}},
        **{"ünï €": {"type": "string", "maxLength": 3}, "": {"const": 1}},
    ),
    "property names that are keywords": _object(
        type={"type": "string", "maxLength": 3}, default={"type": "number"}, enum={"type": "integer"}
    ),
    "annotations": {
        "title": "Thing",
        "description": "A thing",
        "$comment": "c",
        "examples": [{"n": 1}],
        "default": {"n": 0},
        **_object(n={"type": "number", "title": "N", "default": 1.5, "examples": [2.5], "deprecated": True}),
    },
    "deeply nested": _nested(12),
    "openai strict": _object(
        steps={"type": "array", "items": _object(explanation={"type": "string"}, output={"type": "string"})},
        final_answer={"type": "string"},
    ),
    "pydantic model": Item.model_json_schema(),
    "pydantic recursive model": Tree.model_json_schema(),
    "pydantic discriminated union": Owner.model_json_schema(),
    "pydantic constraints": Codes.model_json_schema(),
}
# name -> (schema, the keyword its 400 names)
REFUSED = {
    "false": (False, "false"),
    "uniqueItems": ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    "pydantic set": (pydantic.create_model("S", s=(set[str], ...)).model_json_schema(), "uniqueItems"),
    "overlapping oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    "not": ({"not": {"type": "string"}}, "not"),
    "if/then": ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    "unknown format": ({"type": "string", "format": "color"}, "color"),
    "integer past 64 bits": ({"type": "integer", "minimum": 1e19, "maximum": 2e19}, "integer bounds"),
    "nested too deeply": (_nested(5000), "nested too deeply"),
}
FAST = [
    "ref and $defs",
    "allOf bound past the limit",
    "enum of mixed types",
    "prefixItems, items false",
    "formats",
    "exclusive number bounds",
    "bounds finer than the step",
    "one value",
    "draft 4 exclusive flag",
    "names needing escapes",
    "property names that are keywords",
    "annotations",
    "pydantic model",
    "pydantic discriminated union",
    "pydantic constraints",
]
SEEDS = 4


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


def sweep(llm, names: list[str], seeds: int, max_tokens: int) -> None:
    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=Grammar.json_schema(SUPPORTED[n])
        )
        for n in names
        for seed in range(seeds)
    ]
    outs = llm.generate(["{"] * len(params), params, use_tqdm=False)
    finished = 0
    for i, out in enumerate(outs):
        name = names[i // seeds]
        if out.finish_reason == "stop":
            finished += 1
            schema = SUPPORTED[name] if isinstance(SUPPORTED[name], dict) else {}
            assert not schema_errors(json.loads(out.text), schema), (name, out.text)
        else:  # a random model may run out of tokens inside a string: the text so far still fits
            assert out.finish_reason == "length", (name, out.finish_reason)
    assert finished >= len(outs) * 0.6, finished


def test_user_schemas_give_valid_outputs(llm):
    sweep(llm, FAST, SEEDS, 100)


@pytest.mark.slow
def test_every_user_schema_gives_valid_outputs(llm):
    sweep(llm, list(SUPPORTED), 6, 200)


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_cannot_be_enforced_is_refused_naming_it(llm, name):
    schema, keyword = REFUSED[name]
    with pytest.raises(GrammarError, match=keyword):
        llm.engine.grammars.compile(Grammar.json_schema(schema))


def test_boolean_schemas_and_keywords_that_constrain_nothing():
    assert prepared_schema(True) == {}
    with pytest.raises(GrammarError, match="false matches nothing"):
        prepared_schema(False)
    loose = {"type": "array", "items": {"type": "string"}, "uniqueItems": False}
    assert "uniqueItems" not in prepared_schema(loose)
    assert "uniqueItems" not in prepared_schema({**loose, "uniqueItems": True, "maxItems": 1})
    assert prepared_schema({**loose, "uniqueItems": True})["uniqueItems"] is True
    data = {"const": {"uniqueItems": False}, "type": "object"}
    assert prepared_schema(data) == data


TOOL_PARAMETERS = [
    "formats",
    "ref and $defs",
    "exclusive number bounds",
    "names needing escapes",
    "pydantic model",
]


@pytest.mark.parametrize("parser", ["hermes", "mistral", "llama3_json", "generic"])
def test_forced_tool_calls_with_user_parameters_validate(llm, parser):
    """`tool_choice` "required" in each call format, the parameters taken from the schemas above (named
    calls share the grammar): every whole call's arguments validate against the parameters given."""
    from jaxrs.structured.tools import answer_calls, tool_plan

    tools = [
        {"type": "function", "function": {"name": f"f{i}", "parameters": SUPPORTED[n]}}
        for i, n in enumerate(TOOL_PARAMETERS)
    ]
    plan = tool_plan(llm.tokenizer, tools, "required", None, parser)
    params = [SamplingParams(max_tokens=160, temperature=1.0, seed=s, grammar=plan.grammar) for s in range(6)]
    calls = [
        c
        for o in llm.generate(["x"] * 6, params, use_tqdm=False)
        for c in answer_calls(plan, o.text, o.finish_reason)[1] or []
    ]
    assert calls
    for call in calls:
        parameters = SUPPORTED[TOOL_PARAMETERS[int(call["function"]["name"][1:])]]
        assert not schema_errors(json.loads(call["function"]["arguments"]), parameters), call
