"""Structured output and tools end to end on real models through the server and the openai client:
Qwen2.5-Coder-0.5B-Instruct (its template renders tools, Hermes format) answers JSON schemas, forced
tool calls (whole and streamed) and a two-turn tool conversation; both answer twenty schemas."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from litestar.testing import TestClient

from jaxrs import LLM, SamplingParams
from jaxrs.structured import Grammar
from server import create_app
from tests.gemma3_gguf import fetch_or_skip

pytestmark = pytest.mark.slow

SCHEMAS = [
    (
        "Give a person: name and age.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "Classify the sentence 'I love this film' and list two keywords.",
        {
            "type": "object",
            "properties": {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "keywords": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "required": ["label", "keywords"],
            "additionalProperties": False,
        },
    ),
    (
        "Describe Paris as a city record.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "location": {
                    "type": "object",
                    "properties": {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number"},
                    },
                    "required": ["lat", "lon"],
                },
            },
            "required": ["city", "location"],
            "additionalProperties": False,
        },
    ),
]


def obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object schema (every key required unless `required` says otherwise)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


WORD = {"type": "string", "maxLength": 16}
# Seventeen more prompts and schemas (nested objects, enums, arrays, number bounds, booleans, nulls,
# optional keys) for the demo model, which answers all twenty.
MORE_SCHEMAS = [
    ("Name a fruit and its colour.", obj({"fruit": WORD, "colour": {"enum": ["red", "green", "yellow"]}})),
    ("Rate this restaurant from 1 to 5.", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("Is water wet? Answer as JSON.", obj({"answer": {"type": "boolean"}, "why": WORD})),
    (
        "List three primary colours.",
        obj({"colours": {"type": "array", "items": WORD, "minItems": 3, "maxItems": 3}}),
    ),
    (
        "Give a temperature reading in Celsius.",
        obj({"celsius": {"type": "integer", "minimum": -50, "maximum": 60}, "unit": {"const": "C"}}),
    ),
    (
        "Describe a book: title, author and year.",
        obj({"title": WORD, "author": obj({"first": WORD, "last": WORD}), "year": {"type": "integer"}}),
    ),
    ("Pick a day of the week.", obj({"day": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}})),
    (
        "Give two points on a line.",
        obj(
            {
                "points": {
                    "type": "array",
                    "items": obj({"x": {"type": "integer"}, "y": {"type": "integer"}}),
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
    (
        "Make a to-do item.",
        obj({"task": WORD, "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}}),
    ),
    (
        "Give a product with an optional discount.",
        obj(
            {"name": WORD, "price": {"type": "number", "minimum": 0, "maximum": 1000}, "discount": WORD},
            required=["name", "price"],
        ),
    ),
    ("Answer with a nullable nickname.", obj({"nickname": {"anyOf": [WORD, {"type": "null"}]}})),
    (
        "Describe the weather.",
        obj(
            {
                "sky": {"enum": ["clear", "cloudy", "rain"]},
                "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 150},
            }
        ),
    ),
    (
        "Give an RGB colour.",
        obj({c: {"type": "integer", "minimum": 0, "maximum": 255} for c in ("r", "g", "b")}),
    ),
    (
        "List up to two pets with their species.",
        obj(
            {
                "pets": {
                    "type": "array",
                    "items": obj({"name": WORD, "species": {"enum": ["cat", "dog"]}}),
                    "maxItems": 2,
                }
            }
        ),
    ),
    ("Give a yes/no vote and a score.", obj({"vote": {"enum": ["yes", "no"]}, "score": {"type": "number"}})),
    (
        "Describe a company with its address.",
        obj(
            {
                "company": WORD,
                "address": obj(
                    {"street": WORD, "city": WORD, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
                ),
            }
        ),
    ),
    (
        "Give a matrix of two rows of two integers.",
        obj(
            {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today, in celsius?"}]


def client_for(llm: LLM):
    return TestClient(create_app(llm, served_model_name="m"))


def openai_client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def check_schemas(oai: openai.OpenAI, schemas: list[tuple[str, dict]] = SCHEMAS) -> None:
    for prompt, schema in schemas:
        out = oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=120,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        )
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_qwen_schemas_and_tools():
    llm = LLM(
        str(fetch_or_skip("Qwen2.5-Coder-0.5B-Instruct")), kv_cache_mb=64, max_model_len=1024, max_num_seqs=4
    )
    with client_for(llm) as http:
        oai = openai_client(http)
        check_schemas(oai, SCHEMAS + MORE_SCHEMAS)
        kwargs = dict(
            model="m",
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            parallel_tool_calls=False,
        )
        whole = oai.chat.completions.create(**kwargs)
        [call] = whole.choices[0].message.tool_calls
        assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER["function"]["parameters"])
        assert "paris" in args["city"].lower()
        streamed = ""
        for chunk in oai.chat.completions.create(**kwargs, stream=True):
            for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                streamed += d.function.arguments or ""
        assert streamed == call.function.arguments
        history = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "sky": "sunny"}),
            },
        ]
        # The model repeats its call as bare JSON before echoing the result, which "auto" now reads as a
        # call (as llama.cpp does); "none" keeps the answer as text, where the tool's result shows.
        final = oai.chat.completions.create(
            model="m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=40, temperature=0
        )
        assert final.choices[0].finish_reason in ("stop", "length")
        assert "21" in final.choices[0].message.content
        again = oai.chat.completions.create(
            model="m", messages=history, tools=[WEATHER], max_tokens=40, temperature=0
        )
        assert again.choices[0].finish_reason == "tool_calls"
        assert again.choices[0].message.tool_calls[0].function.name == "get_weather"
    # The Python API gives the server's call (the same greedy tokens, parsed by the same code).
    greedy = SamplingParams(max_tokens=60, temperature=0)
    (out,) = llm.chat(ASK, greedy, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    [direct] = out.outputs[0].tool_calls
    assert out.finish_reason == "tool_calls" and direct["function"]["arguments"] == call.function.arguments
    # A number the model would write to seventeen digits stops at six decimals.
    pi = {"type": "object", "properties": {"pi": {"type": "number"}}, "required": ["pi"]}
    ask_pi = [{"role": "user", "content": "Give pi to many digits, as JSON."}]
    (answer,) = llm.chat(
        ask_pi, SamplingParams(max_tokens=60, temperature=0, grammar=Grammar.json_schema(pi))
    )
    assert answer.finish_reason == "stop" and re.fullmatch(r'\{"pi": 3\.14\d{0,4}\}', answer.text), (
        answer.text
    )


def test_demo_schema(demo_gguf):
    llm = LLM(str(demo_gguf), kv_cache_mb=32, max_model_len=1024, max_num_seqs=4)
    with client_for(llm) as http:
        check_schemas(openai_client(http), SCHEMAS + MORE_SCHEMAS)
