"""The schema walk: subschemas by keyword, never data or names."""

from __future__ import annotations

from jaxrs.structured.subschemas import map_subschemas, walk

SCHEMA = {
    "type": "object",
    "properties": {"enum": {"type": "integer"}, "default": {"items": [{"type": "null"}]}},
    "$defs": {"d": {"anyOf": [{"type": "string"}, True]}},
    "dependencies": {"a": ["b"], "c": {"required": ["d"]}},
    "const": {"properties": {"x": {"type": "number"}}},
    "enum": [{"type": "number"}],
    "default": {"type": "boolean"},
}


def test_walk_visits_schemas_only():
    found = list(walk(SCHEMA))
    assert found[0] is SCHEMA
    assert {"type": "integer"} in found and {"type": "null"} in found and {"type": "string"} in found
    assert {"required": ["d"]} in found
    assert {"type": "number"} not in found and {"type": "boolean"} not in found  # data
    assert len(found) == 7


def test_map_rewrites_immediate_subschemas_by_keyword():
    seen = []
    out = map_subschemas(SCHEMA, lambda sub, keyword: seen.append(keyword) or "x")
    assert sorted(seen) == ["$defs", "dependencies", "properties", "properties"]
    assert out["properties"] == {"enum": "x", "default": "x"} and out["dependencies"] == {
        "a": ["b"],
        "c": "x",
    }
    assert out["const"] == SCHEMA["const"] and out["enum"] == SCHEMA["enum"]
