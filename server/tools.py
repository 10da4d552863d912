"""The server's side of tool calling (`jaxrs.structured.tools` does the work): a bad `tools` or
`tool_choice` is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from jaxrs.structured.tools import ToolError, ToolPlan
from jaxrs.structured.tools import tool_plan as plan_tools
from server.errors import APIError


def tool_plan(*args: Any, **kwargs: Any) -> ToolPlan | None:
    """`jaxrs.structured.tools.tool_plan` (the same arguments), its errors as 400s."""
    try:
        return plan_tools(*args, **kwargs)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
