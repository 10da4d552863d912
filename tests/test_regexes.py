"""`\\d` and `\\w` read as ASCII where that narrows a pattern: the rewrite, and a tiny random model
(which writes any digit Unicode has when it may) held to ASCII digits by a regex and a schema pattern."""

from __future__ import annotations

import json
import re

import pytest

from jaxrs import SamplingParams
from jaxrs.structured import Grammar
from jaxrs.structured.regexes import ascii_classes


@pytest.mark.parametrize(
    "pattern, ascii",
    [
        (r"^\d{2,4}$", r"^[0-9]{2,4}$"),
        (r"[\d.]+\w", r"[0-9.]+[0-9A-Za-z_]"),
        (r"[^\d]\D\W", r"[^\d]\D\W"),  # the Unicode reading is the narrower one there
        (r"\\d\\\d", r"\\d\\[0-9]"),  # an escaped backslash, then one that escapes d
        (r"[]\d][^]\d]", r"[]0-9][^]\d]"),  # a leading ] is literal
        (r"[a-z&&[^\d]]\p{L}\x{41}", r"[a-z&&[^\d]]\p{L}\x{41}"),
    ],
)
def test_ascii_classes(pattern, ascii):
    assert ascii_classes(pattern) == ascii


@pytest.fixture(scope="module")
def llm(structured_llm):
    return structured_llm


def test_digits_are_ascii_in_regexes_and_schema_patterns(llm):
    regex = Grammar.regex(r"\d{2,4}")
    schema = Grammar.json_schema({"type": "string", "pattern": r"^\w{1,3}-\d{2}$"})
    params = [
        SamplingParams(max_tokens=12, temperature=1.0, seed=s, grammar=g)
        for g in (regex, schema)
        for s in range(6)
    ]
    outs = llm.generate(["x"] * len(params), params, use_tqdm=False)
    for out in outs[:6]:
        assert re.fullmatch(r"[0-9]{2,4}", out.text), out.text
    for out in outs[6:]:
        if out.finish_reason == "stop":
            assert re.fullmatch(r"[0-9A-Za-z_]{1,3}-[0-9]{2}", json.loads(out.text)), out.text
