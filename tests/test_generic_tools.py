"""Tool calling on a model whose chat template renders no tools (the generic format): the tools are
described in the system turn, forced and "auto" answers are held to JSON calls or a response, the
history's calls and results become turns a strict user/assistant template renders, and the server
streams the calls as OpenAI deltas. Tiny random byte-level model; its template here writes no tools
and refuses turns that do not alternate, as Gemma's does."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import openai
import pydantic
import pytest
from litestar.testing import TestClient

from jaxrs import LLM, SamplingParams
from jaxrs.structured import Grammar
from jaxrs.structured.generic_tools import generic_conversation
from jaxrs.structured.tool_calls import GenericParser, Parsed, closed_objects
from jaxrs.structured.tools import ToolError, ToolPlan, answer_calls
from server import create_app
from server.routes_chat import assistant_message
from tests.schema_check import Color, Point
from tests.structured_model import save_structured_model
from tests.test_server_structured import ASK, CLOCK, WEATHER

STRICT_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role != 'system' and (m.role == 'user') != (loop.index0 % 2 == (1 if messages[0].role == "
    "'system' else 0)) %}{{ raise_exception('roles must alternate') }}{%- endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_structured_model(tmp_path_factory.mktemp("generic-tools"), seed=1)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": STRICT_TEMPLATE}))
    return LLM(str(path), kv_cache_mb=8, max_model_len=1024, max_num_seqs=4)


def validate(call: dict) -> None:
    tool = next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_required_calls_parse_and_validate_and_the_prompt_describes_the_tools(llm):
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=5, n=2)
    (out,) = llm.chat(
        ASK, params, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, use_tqdm=False
    )
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert prompt.startswith("<|im_start|>system\nYou can call these tools") and '"get_time"' in prompt
    for o in out.outputs:
        assert o.finish_reason == "tool_calls", o.text
        assert o.tool_calls and o.text == ""
        for call in o.tool_calls:
            validate(call)


def test_auto_answers_are_a_call_or_a_response(llm):
    outs = llm.chat(
        [ASK] * 4,
        SamplingParams(max_tokens=120, temperature=1.0, seed=7),
        tools=[WEATHER],
        parallel_tool_calls=False,
        use_tqdm=False,
    )
    for out in outs:
        o = out.outputs[0]
        if o.tool_calls:
            assert o.finish_reason == "tool_calls"
            for call in o.tool_calls:
                validate(call)
        elif o.finish_reason == "stop":  # the response's text, out of its JSON
            assert not o.text.startswith('{"response"')


def test_calls_and_results_round_trip_through_a_strict_template(llm):
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    ]
    (out,) = llm.chat(history, SamplingParams(max_tokens=4), tools=[WEATHER, CLOCK], use_tqdm=False)
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}' in prompt
    assert '"name": "get_time", "content": "noon"' in prompt and "sunny" in prompt
    (none,) = llm.chat(
        history, SamplingParams(max_tokens=4), tools=[WEATHER], tool_choice="none", use_tqdm=False
    )
    assert "You can call these tools" not in llm.tokenizer.decode(none.prompt_token_ids)


def test_the_generic_format_and_a_constraint_other_than_json_do_not_mix(llm):
    params = SamplingParams(max_tokens=4, grammar=Grammar.regex("[a-z]+"))
    with pytest.raises(ToolError) as error:
        llm.chat(ASK, params, tools=[WEATHER], use_tqdm=False)
    assert error.value.param == "tools" and "generic" in str(error.value)
    forced = SamplingParams(max_tokens=4, grammar=Grammar.json_object())
    with pytest.raises(ToolError, match="forces a tool call"):
        llm.chat(ASK, forced, tools=[WEATHER], tool_choice="required", use_tqdm=False)


class Reading(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=6)
    kind: Color  # a `$defs` reference, as pydantic writes nested types


def test_a_json_response_format_joins_auto_answers(llm):
    """`client.chat.completions.parse(response_format=Model, tools=[...])` on a model without tool
    rendering: an "auto" answer is a call or an object of the response format (no `{"response"}`
    wrapper), returned whole as content, whole and streamed, and the prompt names the schema."""
    schema = openai.lib._pydantic.to_strict_json_schema(Reading)
    tools = [openai.pydantic_function_tool(Point)]
    with TestClient(create_app(llm, served_model_name="m")) as c:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
        kinds = set()
        for seed in range(6):
            kwargs = dict(
                model="m", messages=ASK, max_tokens=150, temperature=1.0, seed=seed, response_format=Reading
            )
            try:
                out = oai.chat.completions.parse(**kwargs, tools=tools).choices[0]
            except openai.LengthFinishReasonError:  # a random model may ramble past max_tokens
                continue
            message = out.message
            if message.tool_calls:
                kinds.add("call")
                assert out.finish_reason == "tool_calls" and message.content is None
                assert isinstance(message.tool_calls[0].function.parsed_arguments, Point)
            else:
                kinds.add("answer")
                assert isinstance(message.parsed, Reading), message.content
                with oai.chat.completions.stream(**kwargs, tools=tools) as stream:
                    for _ in stream:
                        pass
                assert stream.get_final_completion().choices[0].message.parsed == message.parsed
        assert kinds == {"call", "answer"}
    one = SamplingParams(max_tokens=1, grammar=Grammar.json_schema(schema))
    (out,) = llm.chat(ASK, one, tools=[WEATHER], use_tqdm=False)
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert "a JSON object of this schema" in prompt and '"$defs"' in prompt and '"response"' not in prompt
    assert llm.engine.blocks.num_used == 0


def test_server_streams_the_calls_it_answers_whole(llm):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with TestClient(create_app(llm, served_model_name="m")) as c:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
        kwargs = dict(
            model="m",
            messages=ASK,
            tools=[WEATHER, CLOCK],
            tool_choice=named,
            max_tokens=120,
            seed=4,
            parallel_tool_calls=False,
        )
        whole = oai.chat.completions.create(**kwargs)
        streamed: dict[int, list[str]] = {}
        for chunk in oai.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                for d in choice.delta.tool_calls or []:
                    parts = streamed.setdefault(d.index, [d.function.name or "", ""])
                    parts[1] += d.function.arguments or ""
    assert llm.engine.blocks.num_used == 0
    calls = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "stop" and calls  # a named call's, as OpenAI's
    assert [[c.function.name, c.function.arguments] for c in calls] == list(streamed.values())
    for call in calls:
        validate(call.model_dump())


def test_tokenize_counts_the_prompt_the_chat_route_feeds(llm):
    """/tokenize with tools renders them as the chat route does (here: the generic format's system
    turn, which the template could not render from `tools` itself)."""
    with TestClient(create_app(llm, served_model_name="m")) as c:
        plain = c.post("/tokenize", json={"messages": ASK}).json()["count"]
        counted = c.post("/tokenize", json={"messages": ASK, "tools": [WEATHER]}).json()["count"]
        body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 1}
        usage = c.post("/v1/chat/completions", json=body).json()["usage"]
    assert counted == usage["prompt_tokens"] > plain


def test_generic_parser():
    parser = GenericParser()
    call = '{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]}'
    parsed = parser.parse(call, final=True)
    assert parsed.content == "" and [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    assert parser.parse('{"response": "hi {there}"}', final=True).content == "hi {there}"
    assert parser.parse('{"tool_calls": [{"name": "f"', final=False).content == ""
    for text in ('{"tool_calls": [{"name": "f", "arg', '{"tool_calls": []}', "plain words"):
        assert parser.parse(text, final=True).content == text and not parser.parse(text, final=True).calls


def test_answers_cut_at_max_tokens_keep_what_is_whole():
    """An answer cut short keeps its whole calls (as the hermes format does) or its response so far,
    rather than coming back as raw JSON content."""
    parser = GenericParser()
    cut = '{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}, {"na'
    assert [(c.name, c.arguments) for c in parser.parse(cut, final=True).calls] == [
        ("f", '{"x": 1}'),
        ("g", "{}"),
    ]
    for text, content in (('{"response": "caf\\u00e9 is', "café is"), ('{"response": "a\\"b\\', 'a"b')):
        assert parser.parse(text, final=True) == Parsed(content, [])


def test_a_response_answer_is_its_text_in_whole_choices():
    """Whole (non-streamed) answers give the response's text as content, as streams do (it came back as
    its JSON), in the Python API's and the server's answers alike."""
    plan = ToolPlan([WEATHER], GenericParser(), None)
    assert answer_calls(plan, '{"response": "Hi there"}', "stop") == ("Hi there", None, "stop")
    calls = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name'
    content, made, reason = answer_calls(plan, calls, "length")
    assert content is None and [c["function"]["name"] for c in made] == ["get_weather"] and reason == "length"
    message, reason = assistant_message('{"response": "Hi there"}', "stop", plan)
    assert (message.content, message.tool_calls, reason) == ("Hi there", msgspec.UNSET, "stop")


def test_closed_objects_close_only_what_says_nothing():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "both": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
            "data": {"const": {"properties": {}}},
        },
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert all("additionalProperties" not in part for part in closed["properties"]["both"]["allOf"])
    assert closed["properties"]["data"] == {"const": {"properties": {}}}
    assert "additionalProperties" not in schema  # the caller's schema is left as it was


def test_generic_conversation_keeps_turns_alternating():
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "r1"}]},
        {"role": "tool", "tool_call_id": "2", "content": "r2"},
    ]
    out = generic_conversation(messages, [WEATHER], forced=True)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert "calls them" in out[0]["content"] and json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "f", "arguments": {}}]
    }
    results = [json.loads(line)["tool_response"] for line in out[3]["content"].split("\n")]
    assert results == [
        {"tool_call_id": "1", "name": "f", "content": "r1"},
        {"tool_call_id": "2", "name": None, "content": "r2"},
    ]
