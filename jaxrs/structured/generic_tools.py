"""Tool calling for models whose chat template renders no tools (SmolLM2, Gemma 3, ...), the way
llama.cpp's generic format does it: the tools are described in the system turn, the answer is one JSON
object, `{"tool_calls": [{"name", "arguments"}, ...]}` or `{"response": "..."}`, held to that shape by a
grammar, and the history's calls and results are written as JSON turns the template can render
(assistant and user messages only).
"""

from __future__ import annotations

import json
from typing import Any

from jaxrs.structured.tool_calls import tool_parameters

CALL_EXAMPLE = '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments>}}]}'


def tools_prompt(tools: list[dict[str, Any]], forced: bool, reply: Any = None) -> str:
    """The system text describing `tools` and the answer's JSON shape (`reply`: the schema a direct
    answer follows, the request's response_format, instead of `{"response": ...}`)."""
    described = [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description", ""),
            "parameters": tool_parameters(t),
        }
        for t in tools
    ]
    if forced:
        shape = f"Answer with one JSON object that calls them: {CALL_EXAMPLE}."
    elif reply is not None:
        shape = (
            f"Answer with one JSON object: {CALL_EXAMPLE} to call tools, or, to answer directly, "
            f"a JSON object of this schema: {json.dumps(reply)}."
        )
    else:
        shape = (
            f"Answer with one JSON object: {CALL_EXAMPLE} to call tools, "
            'or {"response": "<your answer>"} to answer directly.'
        )
    return f"You can call these tools (their arguments as JSON schemas):\n{json.dumps(described)}\n\n{shape}"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))  # as vLLM joins text parts


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # not JSON: kept as the text it is
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


def generic_conversation(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    forced: bool = False,
    reply: Any = None,
) -> list[dict[str, Any]]:
    """`messages` for a template without tools: the tools' description joined to the system turn
    (one is added when there is none; None: no tools offered), each assistant's `tool_calls` as its
    JSON content, and each tool result as a user turn (`{"tool_response": {...}}`, consecutive ones
    in one turn, so user and assistant turns still alternate)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    previous_role = None
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [_call_json(c) for c in m["tool_calls"]]
            names.update({c.get("id", ""): c["function"].get("name", "") for c in m["tool_calls"]})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif role == "tool":
            call_id = m.get("tool_call_id", "")
            result = {"tool_call_id": call_id, "name": names.get(call_id), "content": _text(m.get("content"))}
            text = json.dumps({"tool_response": result})
            if previous_role == "tool":  # results in a row share one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append(dict(m))
        previous_role = role
    if tools:
        prompt = tools_prompt(tools, forced, reply)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{_text(out[0].get('content'))}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
