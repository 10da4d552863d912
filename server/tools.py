"""The server's side of tool calling (`jaxrs.structured.tools` does the work): a bad `tools` or
`tool_choice` is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from jaxrs.structured import Grammar
from jaxrs.structured.tools import ToolError, ToolPlan
from jaxrs.structured.tools import tool_plan as plan_tools
from jaxrs.tokenizer import Tokenizer
from server.errors import APIError


def tool_plan(
    tokenizer: Tokenizer,
    tools: Any,
    tool_choice: Any,
    parallel: bool | None,
    parser_name: str | None,
    response: Grammar | None = None,
) -> ToolPlan | None:
    """`jaxrs.structured.tools.tool_plan`, its errors as 400s."""
    try:
        return plan_tools(tokenizer, tools, tool_choice, parallel, parser_name, response)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
