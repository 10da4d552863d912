"""User-brought constraints on the demo model, through the server and the official openai client: a
pydantic model through `chat.completions.parse`, strict `json_schema` response formats, a pydantic
tool forced by `tool_choice` ("required" and named), a regex, overlapping choices, Lark and GBNF
grammars, and a refusal. Prints one row per request: finished how, valid or not, the text.

    JAX_PLATFORMS=cpu python bench/check_structured_demo.py [--model PATH] [--seeds 2]

Outputs are checked with `jsonschema` (tests/schema_check.py: formats and `multipleOf` checked
strictly); every row should say valid.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import time
from pathlib import Path
from typing import Literal

import openai
import pydantic
from litestar.testing import TestClient

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests.schema_check import schema_errors  # noqa: E402

DEMO = "~/.cache/jaxrs/models/SmolLM2-135M-Instruct.Q4_1.gguf"


class Flag(enum.Enum):
    red = "red"
    blue = "blue"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0)
    area_km2: float = pydantic.Field(gt=0)
    flag: Flag
    founded: int | None = None


class Unit(enum.Enum):
    celsius = "C"
    fahrenheit = "F"


class Weather(pydantic.BaseModel):
    """Its `unit` is a `#/$defs/Unit` reference."""

    city: str = pydantic.Field(max_length=20)
    unit: Unit
    kind: Literal["now", "forecast"]
    days: int = pydantic.Field(ge=1, le=7)


SCHEMAS = {
    "$ref, exclusive bound, nullable": {
        "$defs": {"p": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "formats": {
        "type": "object",
        "properties": {f: {"type": "string", "format": f} for f in ("date", "uuid", "date-time")},
        "required": ["date", "uuid", "date-time"],
        "additionalProperties": False,
    },
    "annotations, keyword-named properties": {
        "title": "T",
        "type": "object",
        "properties": {"default": {"type": "number", "default": 1}, "enum": {"enum": ["x", 1, None]}},
        "required": ["default", "enum"],
        "additionalProperties": False,
    },
    "true": True,
}
GRAMMARS = [
    ("regex \\d{2,4}", {"regex": r"^\d{2,4}$"}, lambda t: re.fullmatch(r"[0-9]{2,4}", t)),
    ("choice a / ab", {"choice": ["a", "ab"]}, lambda t: t in ("a", "ab")),
    ("Lark ?start", {"grammar": '?start: answer\nanswer: "yes" | "no"'}, lambda t: t in ("yes", "no")),
    (
        "GBNF",
        {"grammar": 'root ::= [0-9]{1,3} " " ("apples" | "pears")'},
        re.compile(r"[0-9]{1,3} (apples|pears)").fullmatch,
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()

    from jaxrs import LLM
    from server import create_app

    llm = LLM(str(Path(args.model).expanduser()), kv_cache_mb=32, max_model_len=1024, max_num_seqs=4)
    rows: list[tuple[str, int, str, bool, str]] = []
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    start = time.perf_counter()

    def row(name: str, seed: int, ask, *args) -> None:
        """One request: `ask(*args)` gives (finish reason, valid, text); a 400 is a row too."""
        try:
            rows.append((name, seed, *ask(*args)))
        except openai.BadRequestError as e:
            rows.append((name, seed, "400", False, e.body["message"]))

    with TestClient(create_app(llm, served_model_name="m")) as http:
        oai = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )
        common = dict(model="m", messages=ask, max_tokens=160, temperature=0.8)

        def parsed(seed: int):
            out = oai.chat.completions.parse(**common, seed=seed, response_format=City).choices[0]
            return out.finish_reason, out.message.parsed is not None, out.message.content

        def schema_answer(schema, seed: int):
            strict = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
            out = oai.chat.completions.create(**common, seed=seed, response_format=strict).choices[0]
            text = out.message.content
            return (
                out.finish_reason,
                out.finish_reason == "stop" and not schema_errors(json.loads(text), schema or {}),
                text,
            )

        def tool_answer(tool, choice):
            weather = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
            out = oai.chat.completions.create(
                model="m",
                messages=weather,
                tools=[tool],
                tool_choice=choice,
                max_tokens=120,
                temperature=0.8,
                seed=1,
            ).choices[0]
            arguments = [c.function.arguments for c in out.message.tool_calls or []]
            parameters = tool["function"]["parameters"]
            valid = bool(arguments) and not any(schema_errors(json.loads(a), parameters) for a in arguments)
            return out.finish_reason, valid, " ".join(arguments)

        def grammar_answer(spec, check):
            extra = {"structured_outputs": spec}
            out = oai.chat.completions.create(
                **{**common, "max_tokens": 20}, seed=3, extra_body=extra
            ).choices[0]
            return out.finish_reason, bool(check(out.message.content)), out.message.content

        for seed in range(args.seeds):
            row("parse(City)", seed, parsed, seed)
        for name, schema in SCHEMAS.items():
            for seed in range(args.seeds):
                row(name, seed, schema_answer, schema, seed)
        tool = openai.pydantic_function_tool(Weather)
        row("tool_choice required", 1, tool_answer, tool, "required")
        row(
            "tool_choice named",
            1,
            tool_answer,
            tool,
            {"type": "function", "function": {"name": "Weather"}},
        )
        for name, spec, check in GRAMMARS:
            row(name, 3, grammar_answer, spec, check)
        unique = {"type": "array", "uniqueItems": True}
        rows_before = len(rows)
        row("uniqueItems (a 400 is right)", 0, schema_answer, unique, 0)
        refused = rows[rows_before]
        rows[rows_before] = (*refused[:3], refused[2] == "400" and "uniqueItems" in refused[4], refused[4])
    print("| request | seed | finish | valid | output |\n|---|---|---|---|---|")
    for name, seed, finish, valid, text in rows:
        print(f"| {name} | {seed} | {finish} | {'yes' if valid else 'NO'} | `{text[:90]}` |")
    print(f"{sum(r[3] for r in rows)}/{len(rows)} valid in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
