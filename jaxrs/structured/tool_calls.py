"""Tool calls in a model's output, per family: parsing them out of the text, streaming them as
OpenAI `tool_calls` deltas, and the grammar that forces them (tool_choice `required` or a named function).

Formats (vLLM's parser names): `hermes` (Hermes, Qwen2.5: `<tool_call>{"name", "arguments"}</tool_call>`
blocks), `mistral` (`[TOOL_CALLS]` then a JSON list of {"name", "arguments"}), `llama3_json` (Llama 3.x:
a JSON object {"name", "parameters"}, optionally after `<|python_tag|>`, several joined by `;`), and
`generic` for templates that render no tools (the whole answer one JSON object, `{"tool_calls": [...]}`
or `{"response": ...}`: `jaxrs.structured.generic_tools`).
`parser_for_template` picks one from the chat template; `--tool-call-parser` overrides it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

from jaxrs.structured import Grammar
from jaxrs.structured.compiler import JSON_LAYOUT
from jaxrs.structured.json_schemas import prepared_schema
from jaxrs.structured.subschemas import map_subschemas
from jaxrs.tokenizer import Tokenizer

PARSERS = ("hermes", "mistral", "llama3_json", "generic")


@dataclasses.dataclass
class ParsedCall:
    """One call found in the text: `arguments` is the raw JSON text of the arguments (as far as it has
    been generated, while `complete` is False)."""

    name: str | None
    arguments: str
    complete: bool


@dataclasses.dataclass
class Parsed:
    content: str  # the text outside tool calls
    calls: list[ParsedCall]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


_JSON = json.JSONDecoder()
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _call_body(body: str, complete: bool) -> ParsedCall | None:
    """`{"name": ..., "arguments": {...}}` (in that order, as the grammar writes it) -> a call; the
    arguments are the raw text between the key and the object's closing brace. An incomplete body
    gives what is known so far, holding back a tail that may still be the closing brace."""
    match = _NAME.match(body)
    if match is None:
        if complete:  # another key order: parse it whole
            try:
                obj = json.loads(body)
                args = obj.get("arguments", obj.get("parameters"))
                return ParsedCall(str(obj["name"]), json.dumps(args), True) if args is not None else None
            except (ValueError, KeyError, AttributeError, TypeError):
                return None
        return ParsedCall(None, "", False)
    name = json.loads(f'"{match.group(1)}"')
    rest = body[match.end() :]
    if complete:
        stripped = rest.rstrip()
        if not stripped.endswith("}") or not _valid_json(stripped[:-1]):
            return None
        return ParsedCall(name, stripped[:-1].rstrip(), True)
    return ParsedCall(name, rest.rstrip().rstrip("}").rstrip(), False)


class ToolCallParser:
    """Splits a model's output into content and tool calls (`parse`); `final` says the text is whole.
    `tool_names` are the request's tools (`tool_plan` sets them)."""

    name = ""
    tool_names: frozenset[str] = frozenset()

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError

    def pending(self, content: str) -> int:
        """How many characters at the end of a stream's content (no call found yet) may still begin
        one, and are held back until that is known."""
        return 0

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        """A grammar whose every output is one (or, with `parallel`, one or more) call of `tools`."""
        raise NotImplementedError


_OPEN_KEYS = {"additionalProperties", "patternProperties", "unevaluatedProperties"}
_JOINS = {"allOf", "anyOf", "oneOf", "$ref"}


def closed_objects(schema: Any, joined: bool = False) -> Any:
    """A tool's parameter schema with every object that lists `properties` and says nothing about
    others closed to them (`additionalProperties: false`), as llama.cpp and vLLM's xgrammar read
    schemas: a small model otherwise copies schema keywords into the arguments. An object whose
    properties are joined with another schema's (an `allOf` part, an `anyOf`/`oneOf` branch beside
    `properties`, or one with its own `allOf`/`anyOf`/`oneOf`/`$ref`) stays open: closing each part
    would refuse the others' properties."""
    if not isinstance(schema, dict):
        return schema
    lists_properties = "properties" in schema

    def close(sub: Any, keyword: str) -> Any:
        return closed_objects(sub, keyword == "allOf" or (keyword in ("anyOf", "oneOf") and lists_properties))

    out = map_subschemas(schema, close)
    if lists_properties and not joined and not (_OPEN_KEYS | _JOINS) & out.keys():
        out["additionalProperties"] = False
    return out


# A function without `parameters` takes none (OpenAI: "omitting parameters defines a function with an
# empty parameter list"; vLLM's forced calls read it so): its arguments are `{}`.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameter schema as given, or `NO_PARAMETERS`."""
    return tool["function"].get("parameters") or NO_PARAMETERS


def _tool_parameters(tool: dict[str, Any], index: int) -> dict[str, Any]:
    """A tool's parameter schema, closed, as its own resource (an `$id`), so its local references
    (`#/$defs/...`, as pydantic writes them) resolve inside it wherever the call schema puts it."""
    parameters = closed_objects(tool_parameters(tool))
    return parameters if "$id" in parameters else {"$id": f"urn:jaxrs:tool:{index}", **parameters}


def _call_schema(tools: list[dict[str, Any]], arguments_key: str = "arguments") -> dict[str, Any]:
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, arguments_key: _tool_parameters(t, i)},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for i, t in enumerate(tools)
    ]
    return {"x-guidance": JSON_LAYOUT, "anyOf": options}


def _json_terminal(schema: dict[str, Any]) -> str:
    """A Lark `%json` terminal for `schema` (prepared as a json_schema grammar's is)."""
    return f"%json {json.dumps(prepared_schema(schema))}"


def _token(tokenizer: Tokenizer, text: str) -> str:
    """A Lark terminal for `text`: the token itself where it is one token (added tokens are matched by
    id), else the literal."""
    token_id = tokenizer.token_to_id(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


class HermesParser(ToolCallParser):
    """`<tool_call>` blocks; without them, a call written as a bare JSON object (`{"name": "<one of
    the tools>", "arguments": ...}`, in a ```json fence or not), as Qwen2.5-Coder writes its calls and
    llama.cpp reads them."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.OPEN)
        if start < 0:
            return self._bare_calls(text, final)
        calls, at = [], start
        while at >= 0:
            body_start = at + len(self.OPEN)
            end = text.find(self.CLOSE, body_start)
            complete = end >= 0
            body = text[body_start : end if complete else len(text)]
            if not complete:  # the closing tag may have begun
                body = body[: len(body) - _partial_suffix(body, self.CLOSE)]
            # A final block cut before its closing tag is a call if its JSON is whole (as vLLM reads it).
            call = (final and not complete and _call_body(body, True)) or _call_body(body, complete)
            if call is None:  # not a well-formed call: leave the text as content
                return Parsed(text, [])
            calls.append(call)
            if not complete:
                break
            at = text.find(self.OPEN, end + len(self.CLOSE))
        if final and not calls[-1].complete:  # cut at max_tokens: the whole calls before it stand
            calls.pop()
            if not calls:
                return Parsed(text, [])
        return Parsed(text[:start].rstrip(), calls)

    def _bare_calls(self, text: str, final: bool) -> Parsed:
        calls: list[ParsedCall] = []
        start = at = _bare_call_start(text, 0, self.tool_names)
        while at is not None:
            brace = text.index("{", at)
            try:
                end = _JSON.raw_decode(text, brace)[1]
            except ValueError:  # not whole yet (or cut at max_tokens: the calls before it stand)
                call = None if final else _call_body(text[brace:], complete=False)
                calls += [call] if call is not None else []
                break
            call = _call_body(text[brace:end], complete=True)
            if call is None:
                break
            calls.append(call)
            at = _bare_call_start(text, end, self.tool_names)
        if not calls:
            return Parsed(text, [])
        return Parsed(text[:start].rstrip(), calls)

    def pending(self, content: str) -> int:
        at = next((i for i in _call_starts(content) if _opening(content, i, self.tool_names)), len(content))
        return max(len(content) - at, _partial_suffix(content, self.OPEN))

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        calls = 'start: call ("\\n" call)*' if parallel else "start: call"
        open_, close = _token(tokenizer, self.OPEN), _token(tokenizer, self.CLOSE)
        return Grammar.lark(
            f'{calls}\ncall: {open_} "\\n" body "\\n" {close}\nbody: {_json_terminal(_call_schema(tools))}'
        )


class MistralParser(ToolCallParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"

    def pending(self, content: str) -> int:
        return _partial_suffix(content, self.MARKER)

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.MARKER)
        if start < 0:
            return Parsed(text, [])
        if not final:
            return Parsed(text[:start].rstrip(), [])
        body = text[start + len(self.MARKER) :].strip()
        try:
            items = json.loads(body)
            items = items if isinstance(items, list) else [items]
            calls = [ParsedCall(str(i["name"]), json.dumps(i.get("arguments", {})), True) for i in items]
        except (ValueError, KeyError, TypeError):
            match = re.fullmatch(r"(\w[\w.-]*)\[ARGS\](.*)", body, re.S)  # the v11 layout: name[ARGS]{...}
            if match is None or not _valid_json(match.group(2)):
                return Parsed(text, [])
            calls = [ParsedCall(match.group(1), match.group(2).strip(), True)]
        return Parsed(text[:start].rstrip(), calls)

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        schema = {"x-guidance": JSON_LAYOUT, "type": "array", "items": _call_schema(tools), "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        return Grammar.lark(f"start: {_token(tokenizer, self.MARKER)} {_json_terminal(schema)}")


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        body = text.removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return Parsed(text, [])
        if not final:
            return Parsed("", [])
        calls = []
        for part in body.split(";"):
            call = _call_body(part.strip(), True)
            if call is None:
                return Parsed(text, [])
            calls.append(call)
        return Parsed("", calls)

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return Grammar.lark(f"{start}\ncall: {_json_terminal(_call_schema(tools, 'parameters'))}")


_GENERIC_CALLS = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_ITEM_SEPARATOR = re.compile(r"\s*,?\s*")


def _whole_calls(text: str) -> list[Any]:
    """The complete items of a generic answer's `tool_calls` array, up to where the text ends (an
    answer cut at max_tokens)."""
    match = _GENERIC_CALLS.match(text)
    if match is None:
        return []
    at, items = match.end(), []
    while True:
        at = _ITEM_SEPARATOR.match(text, at).end()
        try:
            item, at = _JSON.raw_decode(text, at)
        except ValueError:
            return items
        items.append(item)


_GENERIC_RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _cut_answer(text: str) -> dict[str, Any]:
    """What a generic answer cut short holds: its whole calls, or its response as far as it got."""
    match = _GENERIC_RESPONSE.match(text)
    if match is None:
        return {"tool_calls": _whole_calls(text)}
    rest = text[match.end() :]
    for cut in range(len(rest), max(-1, len(rest) - 8), -1):  # past a split escape or the closing quote
        try:
            return {"response": json.loads(f'"{rest[:cut]}"')}
        except ValueError:
            continue
    return {}


class GenericParser(ToolCallParser):
    """The answer is one JSON object: `{"tool_calls": [{"name", "arguments"}, ...]}` or `{"response":
    text}` (with `raw_response`, a direct answer is the JSON the request's response_format asks for,
    returned whole as content). Nothing is known before it is whole, so a stream sends it all at the end."""

    name = "generic"
    raw_response: Any = None

    def parse(self, text: str, final: bool) -> Parsed:
        if not final:
            return Parsed("", [])
        try:
            answer = json.loads(text)
        except ValueError:  # cut at max_tokens: the whole calls before the cut stand, or the response
            answer = (
                {"tool_calls": _whole_calls(text)} if self.raw_response is not None else _cut_answer(text)
            )
        if self.raw_response is None and isinstance(answer, dict) and isinstance(answer.get("response"), str):
            return Parsed(answer["response"], [])
        items = answer.get("tool_calls") if isinstance(answer, dict) else None
        if not isinstance(items, list) or not items:
            return Parsed(text, [])
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return Parsed(text, [])
            calls.append(ParsedCall(item["name"], json.dumps(item.get("arguments", {})), True))
        return Parsed("", calls)

    def _calls_schema(self, tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
        calls: dict[str, Any] = {"type": "array", "items": _call_schema(tools), "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        return {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        return Grammar.json_schema(self._calls_schema(tools, parallel))

    def answer_grammar(self, tools: list[dict[str, Any]], parallel: bool, reply: Any = None) -> Grammar:
        """`tool_choice` "auto": calls, or a direct answer under "response" (or, given the schema of
        the request's JSON `reply`, one of that schema: its own resource, so its local references
        resolve)."""
        response = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
            "additionalProperties": False,
        }
        if isinstance(reply, dict):
            response = reply if "$id" in reply else {"$id": "urn:jaxrs:response", **reply}
        elif reply is not None:
            response = reply
        return Grammar.json_schema({"anyOf": [self._calls_schema(tools, parallel), response]})


_BY_NAME = {p.name: p for p in (HermesParser, MistralParser, Llama3JsonParser, GenericParser)}


def parser_named(name: str) -> ToolCallParser:
    if name not in _BY_NAME:
        raise ValueError(f"unknown tool-call parser {name!r} (one of {', '.join(PARSERS)})")
    return _BY_NAME[name]()


def parser_for_template(template: str | None) -> ToolCallParser | None:
    """The parser for the format a chat template teaches its model, or None if it renders no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return HermesParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return Llama3JsonParser()
    return None


class ToolCallStream:
    """Turns a choice's growing text into OpenAI stream deltas: content outside calls, then per call
    its id and name first, argument fragments after. Text that may still turn out to start a call is
    held back until it is known. Without `parallel`, calls after the first are not sent (vLLM's
    parallel_tool_calls: false)."""

    def __init__(self, parser: ToolCallParser, parallel: bool = True):
        self.parser = parser
        self.parallel = parallel
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []

    def push(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """Add generated text; returns (content delta, tool-call deltas)."""
        self.text += delta
        parsed = self.parser.parse(self.text, final)
        content = parsed.content
        if not final and not parsed.calls:
            content = content[: len(content) - self.parser.pending(content)]
        out_content = content[self.content_sent :] if len(content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        deltas = []
        for index, call in enumerate(parsed.calls if self.parallel else parsed.calls[:1]):
            if call.name is None:
                break
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append(
                    {
                        "index": index,
                        "id": self.ids[index],
                        "type": "function",
                        "name": call.name,
                        "arguments": "",
                    }
                )
            fragment = call.arguments[self.args_sent[index] :]
            if fragment:
                self.args_sent[index] = len(call.arguments)
                deltas.append({"index": index, "arguments": fragment})
        return out_content, deltas

    @property
    def called(self) -> bool:
        return bool(self.ids)


def _call_starts(text: str, at: int = 0) -> Iterator[int]:
    """Where a bare call may begin: each `{`, and each backtick (a ``` fence)."""
    return (i for i in range(at, len(text)) if text[i] in "{`")


def _opening(text: str, at: int, names: frozenset[str]) -> str | None:
    """Whether the text from `at` opens a bare call of one of `names`: "call" when it does, "maybe"
    while the text ends before that is known, else None. The opening, as llama.cpp matches it: an
    optional fence line (```, ```json or ```xml), then `{"name": "<name>"`, any whitespace between."""
    i = at

    def take(literal: str) -> bool | None:  # None: the text ends inside `literal`
        nonlocal i
        piece = text[i : i + len(literal)]
        if piece == literal:
            i += len(literal)
            return True
        return None if literal.startswith(piece) and i + len(piece) == len(text) else False

    def fail(taken: bool | None) -> str | None:
        return "maybe" if taken is None else None

    if text.startswith("`", i):
        if (taken := take("```")) is not True:
            return fail(taken)
        for language in ("json", "xml"):
            if (taken := take(language)) is not False:
                if taken is None:
                    return "maybe"
                break
        if (taken := take("\n")) is not True:
            return fail(taken)
    for literal in ("{", '"name"', ":", '"'):
        while i < len(text) and text[i].isspace():
            i += 1
        if (taken := take(literal)) is not True:
            return fail(taken)
    end = text.find('"', i)
    if end < 0:
        return "maybe" if any(name.startswith(text[i:]) for name in names) else None
    return "call" if text[i:end] in names else None


def _bare_call_start(text: str, at: int, names: frozenset[str]) -> int | None:
    """Where the first bare call of one of `names` at or after `at` begins."""
    return next((i for i in _call_starts(text, at) if _opening(text, i, names) == "call"), None)


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` may begin `marker`."""
    for n in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
