"""The weight formats: names, GGUF types, and each one's structure-of-arrays layout.

The layouts themselves (field names, dtypes, elements per entry, family) are the kernels' and live in
`pallas_kernels.formats`; a `FormatSpec` is a layout plus the GGUF type it encodes as.
"""

from __future__ import annotations

import dataclasses

from gguf.constants import GGMLQuantizationType

from jaxrs.errors import JaxrsError
from pallas_kernels.formats import LAYOUTS, Layout


@dataclasses.dataclass(frozen=True)
class FormatSpec(Layout):
    ggml_type: GGMLQuantizationType | None = None  # None: no GGUF encoding (U8M, Q8F, HQQ)


_NO_GGUF_TYPE = ("U8M", "Q8F", "HQQ4", "HQQ8")  # layouts of our own; every other is the GGUF type of its name

FORMATS: dict[str, FormatSpec] = {
    name: FormatSpec(
        *(getattr(layout, f.name) for f in dataclasses.fields(Layout)),
        ggml_type=None if name in _NO_GGUF_TYPE else GGMLQuantizationType[name],
    )
    for name, layout in LAYOUTS.items()
}

QUANTIZED_FORMATS = tuple(name for name, s in FORMATS.items() if s.family != "float")

# spelled the way mistral.rs spells them (`Q4K`, `Q4_K`, `q4k`), plus the shorthands `4` and `8`
_SHORTHANDS = {"4": "Q4_K", "8": "Q8_0"}
_ALIASES = {name.replace("_", ""): name for name in FORMATS} | _SHORTHANDS

_BY_GGML = {s.ggml_type: s.name for s in FORMATS.values() if s.ggml_type is not None}


def parse_format(name: str) -> str:
    """The canonical name (`Q4_K`, `Q8_0`, `HQQ4`, `F16`...) of a format, however it is spelled."""
    key = str(name).strip().upper().replace("_", "").replace("-", "")
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(FORMATS) + " (and shorthands 4 = Q4_K, 8 = Q8_0)"
    raise JaxrsError(f"unknown quantization format {name!r}; valid formats: {valid}")


def spec(fmt: str) -> FormatSpec:
    return FORMATS[parse_format(fmt)]


def format_of_ggml_type(ggml_type: int | GGMLQuantizationType) -> str:
    """Our format name for a GGUF tensor type (an unsupported one raises `JaxrsError`)."""
    try:
        return _BY_GGML[GGMLQuantizationType(int(ggml_type))]
    except (KeyError, ValueError):
        try:
            label = GGMLQuantizationType(int(ggml_type)).name
        except ValueError:
            label = str(ggml_type)
        raise JaxrsError(
            f"GGUF tensor type {label} has no packed layout here "
            f"(supported: {', '.join(t.name for t in _BY_GGML)})"
        ) from None
