"""Tool calling in the Python API (`LLM.chat(tools=...)`), through the pieces the server uses too:
forced calls parse and validate, a named choice calls that function, a call round-trips through the
history, "none" leaves the tools out, and bad tools are errors naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from jaxrs import SamplingParams
from jaxrs.structured import Grammar
from jaxrs.structured.tools import ToolError
from tests.test_server_structured import ASK, CLOCK, WEATHER


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


def validate(call: dict) -> None:
    tool = next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_required_calls_come_back_parsed_and_valid(llm):
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=2)
    (out,) = llm.chat(ASK, params, tools=[WEATHER, CLOCK], tool_choice="required", use_tqdm=False)
    for o in out.outputs:
        assert o.finish_reason == "tool_calls", o.text
        assert o.tool_calls and all(c["id"].startswith("call_") for c in o.tool_calls)
        for call in o.tool_calls:
            validate(call)
        assert "<tool_call>" not in o.text


def test_named_choice_calls_that_function_and_round_trips(llm):
    named = {"type": "function", "function": {"name": "get_weather"}}
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=4)
    (first,) = llm.chat(
        ASK, params, tools=[WEATHER, CLOCK], tool_choice=named, parallel_tool_calls=False, use_tqdm=False
    )
    [call] = first.outputs[0].tool_calls
    assert call["function"]["name"] == "get_weather"
    validate(call)
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
    ]
    (second,) = llm.chat(history, SamplingParams(max_tokens=4), tools=[WEATHER], use_tqdm=False)
    rendered = llm.tokenizer.decode(second.prompt_token_ids)
    assert call["function"]["arguments"] in rendered and "sunny, 21 C" in rendered
    assert "Tools: " in rendered  # the template's tools header
    none_params = SamplingParams(max_tokens=4)
    (none,) = llm.chat(history, none_params, tools=[WEATHER], tool_choice="none", use_tqdm=False)
    assert "Tools: " not in llm.tokenizer.decode(none.prompt_token_ids)


def test_without_tools_chat_is_unchanged(llm):
    (out,) = llm.chat(ASK, SamplingParams(max_tokens=5, temperature=0.0), use_tqdm=False)
    assert out.outputs[0].tool_calls is None and out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_call_parser": "xml"}, None),
    ],
)
def test_bad_tools_name_the_field(llm, kwargs, param):
    with pytest.raises((ToolError, ValueError)) as error:
        llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False, **kwargs)
    if param is not None:
        assert error.value.param == param and param.split("[")[0] in str(error.value)


def test_a_forced_call_and_another_constraint_do_not_mix(llm):
    params = SamplingParams(max_tokens=4, grammar=Grammar.json_object())
    with pytest.raises(ToolError, match="forces a tool call"):
        llm.chat(ASK, params, tools=[WEATHER], tool_choice="required", use_tqdm=False)
