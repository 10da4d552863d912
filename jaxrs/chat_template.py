"""Render a model's Jinja chat template exactly the way transformers' `apply_chat_template` does.

Chat templates are written against transformers' Jinja environment (sandboxed, `trim_blocks`,
`lstrip_blocks`, loop controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`), so any
difference in that environment changes the prompt the model sees. This module rebuilds the same
environment without importing transformers, and compiles each template once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxrs.errors import JaxrsError

# Names a message's reasoning is passed under; transformers copies it to all of them (templates differ).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(JaxrsError):
    """A chat template that does not compile, or that refused the conversation (`raise_exception`)."""


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the body as is.

    transformers uses the tag to find assistant tokens for training; for inference it is transparent, but a
    template that uses it must still compile.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (a sandbox escape route), as transformers does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused this conversation: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts; transformers overrides it so.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` in transformers' environment (cached by the template string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template does not compile: {e.message} (line {e.lineno})"
        ) from None


def _plain(value: Any) -> Any:
    """Plain JSON-like data (dicts, lists, scalars) from mappings and pydantic/msgspec-like objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return value


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to the template: plain dicts, keys whose value is None dropped
    (APIs send `content: null`, which templates would render as "None"), reasoning under all its names."""
    out = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# The variables a caller sets through its own arguments, which extra template variables may not replace.
TEMPLATE_ARGUMENTS = frozenset(
    {"messages", "tools", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token"}
)


def extra_template_variables(variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """vLLM's `chat_template_kwargs` (e.g. `enable_thinking`), checked: one that would replace an argument
    of its own (`TEMPLATE_ARGUMENTS`) raises JaxrsError naming it."""
    taken = sorted(TEMPLATE_ARGUMENTS & set(variables or {}))
    if taken:
        raise JaxrsError(f"chat_template_kwargs may not set {taken[0]!r}")
    return dict(variables or {})


def render_chat_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render `messages` (a list of {role, content, ...} dicts) with `template` as transformers does.

    `extra` reaches the template as variables (e.g. `enable_thinking=False`, `documents=[...]`,
    `pad_token`); a `raise_exception(...)` in the template becomes a `ChatTemplateError` (a `JaxrsError`).
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise ChatTemplateError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update(_plain(extra))  # like transformers, explicit keyword arguments win over special tokens
    variables.setdefault("documents", None)
    try:
        return compiled.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except Exception as e:  # undefined variables, type errors on unexpected message shapes, sandbox refusals
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def open_final_message(rendered: str, messages: Sequence[Any]) -> str:
    """`rendered` cut just after the final message's text, so that the model continues that message
    (transformers' and vLLM's `continue_final_message`: a prefilled answer), as transformers cuts it:
    after the message as written where the template kept its spacing, else after its stripped text."""
    content = _plain(messages[-1]).get("content") if isinstance(messages[-1], Mapping) else None
    if isinstance(content, list):  # its last text part
        texts = [p.get("text") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        content = texts[-1] if texts else None
    if not isinstance(content, str) or not content.strip() or content.strip() not in rendered:
        raise ChatTemplateError(
            "continue_final_message needs a final message whose text the chat template writes"
        )
    at = rendered.rindex(content.strip())
    kept = content.lstrip()
    return rendered[: at + (len(kept) if rendered.startswith(kept, at) else len(content.strip()))]
