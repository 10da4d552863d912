"""Structured output and tool calling through the server with the official openai client, on a tiny
random byte-level model whose template renders tools in the Hermes/Qwen2.5 format: outputs match
their schema, forced tool calls parse and validate (whole and streamed), a tool result round-trips,
and bad constraints are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from litestar.testing import TestClient

from server import create_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "weather in Paris?"}]
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


@pytest.fixture(scope="module")
def oai(llm):
    with TestClient(create_app(llm, served_model_name="m")) as c:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
    assert llm.engine.blocks.num_used == 0


def test_json_schema_response_format_validates(oai):
    out = oai.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=60,
        temperature=1.0,
        seed=2,
        n=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": SCHEMA, "strict": True},
        },
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_other_constraint_fields(oai):
    regex = oai.completions.create(
        model="m", prompt="x", max_tokens=12, extra_body={"structured_outputs": {"regex": "[ab]{4}"}}
    )
    assert len(regex.choices[0].text) == 4 and set(regex.choices[0].text) <= {"a", "b"}
    choice = oai.chat.completions.create(
        model="m", messages=ASK, max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].message.content in ("yes", "no")
    lark = oai.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=8,
        extra_body={"grammar": {"type": "lark", "value": 'start: "ok"'}},
    )
    assert lark.choices[0].message.content == "ok"
    obj = oai.chat.completions.create(
        model="m", messages=ASK, max_tokens=40, seed=1, response_format={"type": "json_object"}
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_required_tool_call_parses_and_validates(oai):
    out = oai.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=80, seed=3
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        tool = next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_call_streamed_equals_its_deltas(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model="m", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=80, seed=4)
    whole = oai.chat.completions.create(**kwargs, parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in oai.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    call["id"], call["name"] = d.id, d.function.name
                call["arguments"] += d.function.arguments or ""
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]
    assert reasons[-1] == "stop" == whole.choices[0].finish_reason  # OpenAI's and vLLM's for a named call
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_result_round_trip(oai, llm):
    """The call and its result go back through the template: the second prompt holds the first, the
    call and the result."""
    first = oai.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = oai.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=5)
    result = len(llm.tokenizer.encode("sunny, 21 C", add_special_tokens=False))
    assert second.usage.prompt_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens + result
    none = oai.chat.completions.create(
        model="m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert (
        none.choices[0].message.tool_calls is None and none.usage.prompt_tokens < second.usage.prompt_tokens
    )


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a("}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"grammar": {"type": "xml", "value": "x"}}, "grammar.type"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "hi"}]},
            "messages[1].tool_call_id",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(oai, extra, param):
    body = {"messages": ASK, **extra}
    known = {k: v for k, v in body.items() if k in ("messages", "response_format", "tools", "tool_choice")}
    others = {k: v for k, v in body.items() if k not in known}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="m", max_tokens=4, **known, extra_body=others)
    assert caught.value.body["param"] == param, caught.value.body


@pytest.mark.parametrize("depth", [300, 900, 5000])
def test_a_deeply_nested_schema_is_a_400(llm, depth):
    schema = '{"type": "array", "items": ' * depth + "{}" + "}" * depth
    body = '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, '
    body += (
        '"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": ' + schema + "}}}"
    )
    with TestClient(create_app(llm, served_model_name="m")) as client:
        out = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text  # llguidance's own limit, then ours (a 500 before)
    assert depth < 900 or "nested too deeply" in out.json()["error"]["message"]
