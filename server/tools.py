"""The request side of tool calling: `tools` and `tool_choice` checked, the format's parser picked,
history messages (`tool` results, assistant `tool_calls`) put in the shape chat templates read, and
the grammar that makes `required` and named choices always produce valid calls.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxrs.structured import Grammar
from jaxrs.tokenizer import Tokenizer
from server.errors import APIError
from server.tool_calls import ToolCallParser, parser_for_template, parser_named


@dataclasses.dataclass
class ToolPlan:
    """What a request with tools needs: the tools for the template, the parser for the output, and
    the grammar forcing a call (None: the model may answer in text)."""

    tools: list[dict[str, Any]]
    parser: ToolCallParser
    grammar: Grammar | None


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "tools must be a non-empty list", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
        ):
            raise APIError(
                400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools[{i}].function.name is missing", param=f"tools[{i}].function.name")
        if name in names:
            raise APIError(
                400, f"tools[{i}].function.name {name!r} is given twice", param=f"tools[{i}].function.name"
            )
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema object",
                param=f"tools[{i}].function.parameters",
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
            raise APIError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice")
        return "required", named
    raise APIError(
        400,
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def tool_plan(
    tokenizer: Tokenizer, tools: Any, tool_choice: Any, parallel: bool | None, parser_name: str | None
) -> ToolPlan | None:
    """None when the request has no tools or `tool_choice` is "none" (the tools are then left out of
    the prompt). A model whose chat template renders no tools, with no parser named, is a 400."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    tools = _check_tools(tools)
    choice, allowed = _chosen(tool_choice, tools)
    if choice == "none":
        return None
    template = tokenizer.chat_template
    if not template or "tools" not in template:
        raise APIError(400, "tools: this model's chat template does not render tools", param="tools")
    parser = parser_named(parser_name) if parser_name else parser_for_template(template)
    if parser is None:
        raise APIError(
            400,
            "tools: no tool-call format is known for this model's chat template; "
            "start the server with --tool-call-parser",
            param="tools",
        )
    grammar = parser.grammar(allowed, parallel is not False, tokenizer) if choice == "required" else None
    return ToolPlan(tools, parser, grammar)


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
