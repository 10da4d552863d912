"""Tool-call parsing per format, the streamed deltas (which must add up to the whole parse), and the
parser chosen from a chat template."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from jaxrs import SamplingParams
from jaxrs.structured.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    Parsed,
    ToolCallStream,
    closed_objects,
    parser_for_template,
    parser_named,
)
from jaxrs.structured.tools import answer_calls, tool_plan
from tests.schema_check import Color, Point

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
    '</tool_call>\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'
)


def test_hermes_parses_content_and_calls_with_raw_arguments():
    parsed = HermesParser().parse(HERMES, final=True)
    assert parsed.content == "Let me check."
    assert [(c.name, c.arguments) for c in parsed.calls] == [
        ("weather", '{"city": "Paris", "days": [1, 2]}'),
        ("time", "{}"),
    ]


def test_hermes_leaves_malformed_calls_as_text():
    text = "<tool_call>\nnot json\n</tool_call>"
    assert HermesParser().parse(text, final=True).calls == []
    assert HermesParser().parse(text, final=True).content == text
    unfinished = '<tool_call>\n{"name": "f", "arguments": {"a": 1'
    assert HermesParser().parse(unfinished, final=True).calls == []  # cut at max_tokens: text
    cut = HERMES + '\n<tool_call>\n{"name": "f", "argu'
    assert [c.name for c in HermesParser().parse(cut, final=True).calls] == ["weather", "time"]


@pytest.mark.parametrize("tail", ["", "\n", "\n</tool", "\n</tool_call"])
def test_hermes_takes_a_whole_call_whose_closing_tag_was_cut(tail):
    """A forced call cut at max_tokens after its JSON, before `</tool_call>`, is still a call, as vLLM's
    hermes parser reads an unclosed final block; the whole-call and streamed readings agree."""
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}' + tail
    parsed = HermesParser().parse(text, final=True)
    assert parsed.content == "Sure." and [(c.name, c.arguments, c.complete) for c in parsed.calls] == [
        ("f", '{"a": [1, 2]}', True)
    ]
    stream = ToolCallStream(HermesParser())
    deltas = [d for ch in text for d in stream.push(ch, final=False)[1]] + stream.push("", final=True)[1]
    assert "".join(d["arguments"] for d in deltas) == '{"a": [1, 2]}'


# Qwen2.5-Coder-0.5B's answer (temperature 0) to "What's the weather in Paris?" with a weather tool:
# a fenced JSON object, not the <tool_call> block its template asks for.
FENCED = (
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n'
    '    "unit": "celsius"\n  }\n}\n```'
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def hermes_for(*names: str) -> HermesParser:
    parser = HermesParser()
    parser.tool_names = frozenset(names)
    return parser


def test_hermes_reads_bare_json_calls_of_the_tools():
    """A call written as a JSON object, fenced or not, is a call when it names one of the request's
    tools (as llama.cpp reads Qwen2.5-Coder's); other JSON and code stay content."""
    (call,) = hermes_for("get_weather").parse(FENCED, final=True).calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    two = 'Sure.\n```json\n{"name": "a", "arguments": {"x": 1}}\n```\n{"name": "b", "arguments": {}}'
    parsed = hermes_for("a", "b").parse(two, final=True)
    assert parsed.content == "Sure." and [(c.name, c.arguments) for c in parsed.calls] == [
        ("a", '{"x": 1}'),
        ("b", "{}"),
    ]
    code = 'Like this:\n```python\nprint({"name": "get_weather"})\n```'
    for parser, text in (
        (hermes_for("other"), FENCED),
        (HermesParser(), FENCED),
        (hermes_for("get_weather"), code),
    ):
        assert parser.parse(text, final=True) == Parsed(text, [])
    plan = tool_plan(None, [WEATHER], "auto", None, "hermes")
    content, calls, reason = answer_calls(plan, FENCED, "stop")
    assert content is None and calls[0]["function"]["name"] == "get_weather" and reason == "tool_calls"


def test_a_named_call_finishes_with_stop_as_openai_reports_it(structured_llm):
    """OpenAI (and vLLM) finish a forced named function's answer with "stop", "auto" and "required"
    answers that made calls with "tool_calls"; a cut answer stays "length"."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, reason in (("auto", "tool_calls"), ("required", "tool_calls"), (named, "stop")):
        plan = tool_plan(structured_llm.tokenizer, [WEATHER], choice, None, "hermes")
        assert answer_calls(plan, FENCED, "stop")[2] == reason
        assert answer_calls(plan, FENCED, "length")[2] == "length"


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    """vLLM filters a choice's calls to the first when parallel_tool_calls is false, whole and streamed
    (a model may write several where no grammar stops it, tool_choice "auto")."""
    every = answer_calls(tool_plan(None, [WEATHER], "auto", None, "hermes"), HERMES, "stop")[1]
    assert [c["function"]["name"] for c in every] == ["weather", "time"]
    plan = tool_plan(None, [WEATHER], "auto", False, "hermes")
    content, calls, reason = answer_calls(plan, HERMES, "stop")
    assert content == "Let me check." and reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("weather", '{"city": "Paris", "days": [1, 2]}')
    ]
    stream = ToolCallStream(plan.parser, plan.parallel)
    deltas = [d for ch in HERMES for d in stream.push(ch, final=False)[1]] + stream.push("", final=True)[1]
    assert {d["index"] for d in deltas} == {0} and [d["name"] for d in deltas if "name" in d] == ["weather"]


@pytest.mark.parametrize("step", [1, 4])
def test_a_streamed_bare_call_holds_back_only_what_may_open_one(step):
    stream = ToolCallStream(hermes_for("get_weather"))
    content, arguments = "", ""
    text = "Checking.\n" + FENCED
    for i in range(0, len(text), step):
        got, deltas = stream.push(text[i : i + step], final=i + step >= len(text))
        content += got
        arguments += "".join(d["arguments"] for d in deltas)
    assert content.rstrip() == "Checking." and stream.called
    assert arguments == hermes_for("get_weather").parse(FENCED, final=True).calls[0].arguments
    code = ToolCallStream(hermes_for("get_weather"))
    assert code.push('x = {"a": 1', final=False)[0] == 'x = {"a": 1'  # ruled out: sent at once
    assert code.push(' and {"na', final=False)[0] == " and "  # may still open a call: held


def test_mistral_and_llama3_json():
    mistral = MistralParser().parse('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', final=True)
    assert [(c.name, json.loads(c.arguments)) for c in mistral.calls] == [("f", {"x": 1})]
    v11 = MistralParser().parse('[TOOL_CALLS]f[ARGS]{"x": 2}', final=True)
    assert [(c.name, c.arguments) for c in v11.calls] == [("f", '{"x": 2}')]
    llama = Llama3JsonParser().parse(
        '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', final=True
    )
    assert [(c.name, c.arguments) for c in llama.calls] == [("f", '{"x": 1}'), ("g", "{}")]
    assert Llama3JsonParser().parse("Plain answer.", final=True).calls == []


@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_add_up_to_the_whole_parse(step):
    stream = ToolCallStream(HermesParser())
    content, calls = "", {}
    for i in range(0, len(HERMES), step):
        text, deltas = stream.push(HERMES[i : i + step], final=i + step >= len(HERMES))
        content += text
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                assert call["name"] is None and d["arguments"] == ""  # id and name come first, once
                call["name"] = d["name"]
            call["arguments"] += d["arguments"]
    whole = HermesParser().parse(HERMES, final=True)
    assert content.rstrip() == whole.content
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.name, c.arguments) for c in whole.calls
    ]
    assert stream.called


def test_a_stream_without_calls_is_all_content():
    stream = ToolCallStream(HermesParser())
    text = "The <tool word is fine here"
    got = "".join(stream.push(ch, final=i == len(text) - 1)[0] for i, ch in enumerate(text))
    assert got == text and not stream.called


def test_parser_from_template_and_by_name():
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert parser_for_template("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert parser_for_template("{% if tools %}<|python_tag|>{% endif %}").name == "llama3_json"
    assert parser_for_template("{{ messages }}") is None
    assert parser_named("mistral").name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        parser_named("nope")


class _Paint(pydantic.BaseModel):
    """A pydantic tool: its parameters reach each other through `#/$defs/...`."""

    color: Color
    at: Point | None = None
    path: list[Point] = pydantic.Field(default_factory=list, max_length=2)


@pytest.mark.parametrize("parser", ["hermes", "mistral", "llama3_json", "generic"])
def test_forced_call_grammars_take_parameters_with_local_references(structured_llm, parser):
    tool = openai.pydantic_function_tool(_Paint)
    plan = tool_plan(structured_llm.tokenizer, [tool], "required", None, parser)
    structured_llm.engine.grammars.compile(plan.grammar)  # each tool's "#/$defs/..." resolves in it


def test_forced_calls_of_a_pydantic_tool_validate(structured_llm):
    tool = openai.pydantic_function_tool(_Paint)
    plan = tool_plan(structured_llm.tokenizer, [tool], "required", None, None)
    params = [SamplingParams(max_tokens=150, temperature=1.0, seed=s, grammar=plan.grammar) for s in range(4)]
    outs = structured_llm.generate(["paint"] * 4, params, use_tqdm=False)
    calls = [c for o in outs for c in answer_calls(plan, o.text, o.finish_reason)[1] or []]
    assert calls, [o.text for o in outs]
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_a_function_without_parameters_is_called_with_none(structured_llm):
    """OpenAI: omitting `parameters` defines a function with an empty parameter list, so a forced
    call's arguments are `{}` (an open object let a small model invent arguments)."""
    now = {"type": "function", "function": {"name": "now"}}
    plan = tool_plan(structured_llm.tokenizer, [now], "required", False, None)
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, grammar=plan.grammar) for s in range(6)]
    outs = structured_llm.generate(["time?"] * 6, params, use_tqdm=False)
    calls = [answer_calls(plan, o.text, o.finish_reason)[1] or [] for o in outs]
    got = [[(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in cs] for cs in calls]
    assert got == [[("now", {})]] * 6, [o.text for o in outs]


def test_objects_joined_by_a_union_beside_properties_stay_open():
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "anyOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "string"}}}],
        "$defs": {"properties": {"type": "object", "properties": {"z": {}}}},
    }
    closed = closed_objects(schema)
    assert "additionalProperties" not in closed  # closing it would refuse "a" and "b"
    assert all("additionalProperties" not in branch for branch in closed["anyOf"])
    assert closed["$defs"]["properties"]["additionalProperties"] is False  # a definition's name
    alone = closed_objects({"anyOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})
    assert all(branch["additionalProperties"] is False for branch in alone["anyOf"])
