"""Tool calling around the engine, for the server and `LLM.chat` alike: `tools` and `tool_choice`
checked, the format's parser picked, history messages (`tool` results, assistant `tool_calls`) put in
the shape chat templates read, the grammar that makes `required` and named choices always produce
valid calls, and the calls parsed out of a finished answer. A model whose template renders no tools
takes them in the generic format (`generic_tools`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.structured import Grammar
from jaxrs.structured.generic_tools import generic_conversation
from jaxrs.structured.grammar import GrammarError
from jaxrs.structured.tool_calls import (
    PARSERS,
    GenericParser,
    ToolCallParser,
    new_call_id,
    parser_for_template,
    parser_named,
)
from jaxrs.tokenizer import Tokenizer


class ToolError(JaxrsError):
    """Bad `tools` or `tool_choice`, or tools a model cannot take; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class ToolPlan:
    """What a request with tools needs: the tools for the template, the parser for the output, and
    the grammar forcing a call (None: the model may answer in text)."""

    tools: list[dict[str, Any]]
    parser: ToolCallParser
    grammar: Grammar | None
    forced: bool = False  # tool_choice "required" or a named function
    named: bool = False  # a named function: its answers finish with "stop", as OpenAI's and vLLM's do
    parallel: bool = True  # False: only the first call is kept (vLLM's parallel_tool_calls: false)

    @property
    def response(self) -> Any:
        """The generic format under "auto" with a JSON output constraint: the schema a direct answer
        follows (in place of `{"response": ...}`; the constraint joins the calls instead of being
        refused), as its parser reads answers; None otherwise."""
        return getattr(self.parser, "raw_response", None)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools for the chat template: none in the generic format, which describes them itself."""
        return None if isinstance(self.parser, GenericParser) else self.tools


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list", "tools")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
        ):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"tools[{i}].function.name is missing", f"tools[{i}].function.name")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is given twice", f"tools[{i}].function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolError(
                f"tools[{i}].function.parameters must be a JSON schema object",
                f"tools[{i}].function.parameters",
            )
    return tools


def _chosen(tool_choice: Any, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """("none" | "auto" | "required", the tools a call may use)."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return tool_choice or "auto", tools
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise ToolError(f"tool_choice names {name!r}, which is not among tools", "tool_choice")
        return "required", named
    raise ToolError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def json_reply(response: Grammar | None) -> Any:
    """The JSON schema an output constraint holds answers to (None: not a JSON constraint)."""
    if response is None or response.kind not in ("json_schema", "json_object"):
        return None
    return response.value if response.kind == "json_schema" else {"type": "object"}


def tool_plan(
    tokenizer: Tokenizer,
    tools: Any,
    tool_choice: Any,
    parallel: bool | None,
    parser_name: str | None,
    response: Grammar | None = None,
) -> ToolPlan | None:
    """None when the request has no tools or `tool_choice` is "none" (the tools are then left out of
    the prompt). A model whose chat template renders no tools takes the generic format; one that
    renders them in a format no parser knows needs a parser named. `response`: the request's output
    constraint, which a generic "auto" answer follows when it is JSON (`response_format`)."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    tools = _check_tools(tools)
    choice, allowed = _chosen(tool_choice, tools)
    if choice == "none":
        return None
    if parser_name:
        parser = parser_named(parser_name)
    elif renders_tools(tokenizer):
        parser = parser_for_template(tokenizer.chat_template)
    else:
        parser = GenericParser()
    if parser is None:
        raise ToolError(
            "tools: no tool-call format is known for this model's chat template; "
            f"name one ({', '.join(PARSERS)}) with tool_call_parser (the server's --tool-call-parser)",
            "tools",
        )
    parser.tool_names = frozenset(t["function"]["name"] for t in allowed)
    # A named function is called once (OpenAI's and vLLM's reading); "required" may call several.
    parallel = parallel is not False and not isinstance(tool_choice, dict)
    try:
        if choice == "required":
            grammar = parser.grammar(allowed, parallel, tokenizer)
        elif isinstance(parser, GenericParser):  # its answers are always JSON: a call or a response
            parser.raw_response = json_reply(response)
            grammar = parser.answer_grammar(allowed, parallel, parser.raw_response)
        else:
            grammar = None
    except GrammarError as e:
        raise ToolError(f"tools: {e}", "tools") from None
    except RecursionError:
        raise ToolError("tools: a parameter schema is nested too deeply", "tools") from None
    forced, named = choice == "required", isinstance(tool_choice, dict)
    return ToolPlan(tools, parser, grammar, forced, named, parallel)


def renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat template writes the `tools` it is given."""
    return bool(tokenizer.chat_template) and "tools" in tokenizer.chat_template


def tool_conversation(
    tokenizer: Tokenizer, plan: ToolPlan | None, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The messages the chat template renders: as they are where it renders tools itself; else the
    generic format's (the tools described in the system turn, calls and results as JSON turns)."""
    if plan is not None and isinstance(plan.parser, GenericParser):
        return generic_conversation(messages, plan.tools, plan.forced, plan.response)
    if plan is None and not renders_tools(tokenizer):
        if any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            return generic_conversation(messages, None)
    return messages


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's `tool_calls` with their arguments as objects, as templates expect (they
    write `arguments | tojson`); arguments that are not JSON stay text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass
        out.append({**call, "function": function})
    return {**message, "tool_calls": out}


def answer_calls(
    plan: ToolPlan | None, text: str, finish_reason: str | None
) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """A finished answer's content (the generic format's `response` out of its JSON), its tool calls in
    OpenAI's shape (`{id, type, function: {name, arguments}}`; None when it made none), and its finish
    reason (`call_finish_reason`). Without a plan the text is all content; without
    parallel calls, only the first call is kept (as vLLM filters them)."""
    parsed = plan.parser.parse(text, final=True) if plan is not None else None
    if parsed is None:
        return text, None, finish_reason
    if not parsed.calls:
        return parsed.content, None, finish_reason
    calls = [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in (parsed.calls if plan.parallel else parsed.calls[:1])
    ]
    return parsed.content or None, calls, call_finish_reason(plan, finish_reason)


def call_finish_reason(plan: ToolPlan, finish_reason: str | None) -> str | None:
    """The finish reason of an answer that made calls: "tool_calls" where it stopped on its own,
    except for a named function, which OpenAI (and vLLM) finish with "stop"; "length" stays."""
    return "tool_calls" if finish_reason == "stop" and not plan.named else finish_reason


def tool_params(plan: ToolPlan | None, params: SamplingParams) -> SamplingParams:
    """`params` for a request with tools: a forced call's grammar (which no other output constraint
    may join; a generic "auto" answer's takes a JSON one in, see `tool_plan`), and special tokens kept
    in the text, as call markers may be special tokens."""
    if plan is None:
        return params
    grammar = params.grammar
    if plan.grammar is not None:
        if grammar is not None and (plan.response is None or json_reply(grammar) != plan.response):
            if not plan.forced:
                raise ToolError(
                    "tools on a model whose template renders none answer in JSON (the generic "
                    "format); only a JSON output constraint (response_format) can join them",
                    "tools",
                )
            raise ToolError("tool_choice forces a tool call; drop the output constraint", "tool_choice")
        grammar = plan.grammar
    return dataclasses.replace(params, grammar=grammar, skip_special_tokens=False)
