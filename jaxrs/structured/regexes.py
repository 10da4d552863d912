"""Regular expressions with the ASCII `\\d` and `\\w` users mean.

llguidance reads Rust regex syntax, where `\\d` is any Unicode digit and `\\w` any Unicode word
character, so a sampler exploring the grammar writes `٣` or `６` for `\\d{2,4}`. JSON Schema's
`pattern` is ECMA-262, where they are `[0-9]` and `[A-Za-z0-9_]`, and vLLM's regex backends read them
so. Only the narrowing is done: outside a class and inside a plain one; in a negated class (`[^\\d]`)
the Unicode reading is already the narrower, so it stays.
"""

from __future__ import annotations

ASCII = {"d": "0-9", "w": "0-9A-Za-z_"}


def ascii_classes(pattern: str) -> str:
    """`pattern` with `\\d` and `\\w` as their ASCII classes wherever that only narrows it."""
    out: list[str] = []
    classes: list[bool] = []  # the open classes (Rust nests them), each negated or not
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in ASCII and not classes:
                out.append(f"[{ASCII[escaped]}]")
            elif escaped in ASCII and not classes[-1]:
                out.append(ASCII[escaped])
            else:
                out.append(c + escaped)
            i += 2
            continue
        if c == "[":
            negated = pattern.startswith("^", i + 1)
            classes.append(negated)
            start = i + 1 + negated
            out.append(pattern[i:start])
            i = start
            if pattern.startswith("]", i):  # a leading ] is literal
                out.append("]")
                i += 1
            continue
        if c == "]" and classes:
            classes.pop()
        out.append(c)
        i += 1
    return "".join(out)
