"""The request fields that constrain output -> one `Grammar`, compiled now so a bad one is a 400.

OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` (`json`,
`regex`, `choice`, `grammar`, `json_object`) and its older `guided_*` fields, and mistral.rs's
`grammar` (`regex`, `json_schema`, `lark`). At most one may be given; a kind this server cannot
enforce is a 400 naming the field, never free text.
"""

from __future__ import annotations

from typing import Any

from jaxrs.engine.engine import Engine
from jaxrs.errors import JaxrsError
from jaxrs.structured import Grammar
from server.errors import APIError
from server.schemas import SamplingFields

_VLLM_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_MISTRALRS_KINDS = {"regex": "regex", "json_schema": "json_schema", "lark": "lark"}
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _response_format(value: Any) -> Grammar | None:
    param = "response_format"
    if not isinstance(value, dict) or "type" not in value:
        raise APIError(400, "response_format must be an object with a type", param=param)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError(
                400,
                "response_format.json_schema must be an object with a schema",
                param="response_format.json_schema.schema",
            )
        return Grammar.json_schema(spec["schema"])
    raise APIError(
        400,
        f"response_format.type {kind!r} is not supported (text, json_object, json_schema)",
        param="response_format.type",
    )


def _structured_outputs(value: Any) -> Grammar:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise APIError(400, "structured_outputs must be an object", param=param)
    given = {k: v for k, v in value.items() if v not in (None, False)}
    unknown = sorted(set(given) - set(_VLLM_KINDS) - {"json_object"})
    if unknown:
        raise APIError(
            400,
            f"structured_outputs.{unknown[0]} is not supported (json, regex, choice, grammar, json_object)",
            param=f"{param}.{unknown[0]}",
        )
    if len(given) != 1:
        raise APIError(400, "structured_outputs must give exactly one constraint", param=param)
    ((key, spec),) = given.items()
    return Grammar.json_object() if key == "json_object" else Grammar(_VLLM_KINDS[key], spec)


def _mistralrs_grammar(value: Any) -> Grammar:
    if not isinstance(value, dict) or "type" not in value or "value" not in value:
        raise APIError(400, "grammar must be an object with a type and a value", param="grammar")
    kind = _MISTRALRS_KINDS.get(value["type"])
    if kind is None:
        raise APIError(
            400,
            f"grammar.type {value['type']!r} is not supported ({', '.join(_MISTRALRS_KINDS)})",
            param="grammar.type",
        )
    return Grammar(kind, value["value"])


def request_grammar(engine: Engine, req: SamplingFields) -> Grammar | None:
    """The request's constraint (None without one), compiled against the model's vocabulary; any
    problem is a 400 naming the field it came from."""
    fields: list[tuple[str, Any]] = [
        (name, getattr(req, name))
        for name in ("response_format", "structured_outputs", "grammar", *_GUIDED)
        if getattr(req, name) is not None
    ]
    if not fields:
        return None
    if len(fields) > 1:
        names = " and ".join(name for name, _ in fields)
        raise APIError(400, f"give one output constraint, not {names}", param=fields[1][0])
    name, value = fields[0]
    try:
        if name == "response_format":
            grammar = _response_format(value)
        elif name == "structured_outputs":
            grammar = _structured_outputs(value)
        elif name == "grammar":
            grammar = _mistralrs_grammar(value)
        else:
            grammar = Grammar(_GUIDED[name], value)
        if grammar is not None:
            engine.grammars.compile(grammar)
    except JaxrsError as e:
        raise APIError(400, f"{name}: {e}", param=name) from None
    return grammar
