"""The weight formats: names, GGUF types, and the structure-of-arrays layout of each.

Every format quantizes along the last (`in`) axis of a `[..., out, in]` weight, in blocks of
`block` elements, exactly as GGUF stores rows. A packed tensor is a set of named arrays, each
`[..., out, in // per]` for its `per` (elements per entry), so a tile of rows/columns of the weight
maps to a tile of every array: what a kernel that dequantizes tiles in place needs.

Layouts (I = in; bytes keep GGUF's order inside a block, only the scales are pulled out and
unpacked so a kernel reads them with plain indexing):

- Q4_0: qs u8 [I/2] (block of 32: byte j low nibble = element j, high = j+16), d f16 [I/32].
- Q4_1: qs, d as Q4_0 plus m f16 [I/32] (w = d*q + m).
- Q5_0: qs as Q4_0, qh u32 [I/32] (bit j = 5th bit of element j), d f16 [I/32].
- Q5_1: Q5_0 plus m f16 [I/32].
- Q8_0: qs i8 [I], d f16 [I/32].
- U8M: qs u8 [I], d, m f32 [I/32]; w = d*q + m. No GGUF type: the layout XLA:CPU reads fastest (one
  byte per weight, no bit fiddling), which Q4_1, Q5_1, Q4_K and Q5_K move into exactly (`transcode`).
- Q2_K: qs u8 [I/4] (per 256: byte 32n+l, bits 2j = element 128n+32j+l), sc u8 [I/16] (GGUF's
  byte: low nibble scale, high nibble min), d, dmin f16 [I/256].
- Q3_K: hmask u8 [I/8] (per 256: byte l bit b = high bit of element 32b+l), qs as Q2_K,
  sc i8 [I/16] (the 6-bit scales unpacked, 32 already subtracted), d f16 [I/256].
- Q4_K: qs u8 [I/2] (per 256: byte 32k+l low nibble = element 64k+l, high = 64k+32+l),
  sc u8 [I/32], m u8 [I/32] (the 6-bit scales and mins unpacked), d, dmin f16 [I/256].
- Q5_K: Q4_K plus qh u8 [I/8] (per 256: byte l bit b = 5th bit of element 32b+l).
- Q6_K: ql u8 [I/2] (per 256: byte 64n+32k+l low nibble = element 128n+32k+l, high = +64),
  qh u8 [I/4] (byte 32n+l bits 2j = top two bits of element 128n+32j+l), sc i8 [I/16], d f16 [I/256].
- Q8_K: qs i8 [I], d f32 [I/256] (GGUF's bsums are dropped and recomputed on save).
- HQQ4: qs u8 [I/2] (group of 64: byte l low nibble = element l, high = l+32), scale, zero f16
  [I/64]; w = (q - zero) * scale.
- HQQ8: qs u8 [I], scale, zero f16 [I/64].
- F32, F16, BF16: w [I] unquantized.

The unpacked K-quant scales cost a few bytes per 256 weights (Q3_K 114 vs 110 bytes, Q4_K 148
vs 144, Q5_K 180 vs 176); Q8_K saves its 32 bytes of bsums.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from gguf.constants import GGMLQuantizationType

from jaxrs.errors import JaxrsError

u8, i8, u32 = np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint32)
f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
bf16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a packed tensor: `[..., out, in // per]` of `dtype`."""

    name: str
    dtype: np.dtype
    per: int


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    name: str
    block: int  # quantization block along `in`: `in` must be a multiple of it
    fields: tuple[Field, ...]
    ggml_type: GGMLQuantizationType | None  # None: no GGUF encoding (HQQ)
    family: str  # "float", "legacy" (32-blocks), "k" (256-superblocks), "hqq"

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def bits_per_weight(self) -> float:
        return sum(8 * f.dtype.itemsize / f.per for f in self.fields)


T = GGMLQuantizationType


def _spec(name: str, block: int, family: str, ggml: GGMLQuantizationType | None, *fields) -> FormatSpec:
    return FormatSpec(name, block, tuple(Field(*f) for f in fields), ggml, family)


FORMATS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        _spec("F32", 1, "float", T.F32, ("w", f32, 1)),
        _spec("F16", 1, "float", T.F16, ("w", f16, 1)),
        _spec("BF16", 1, "float", T.BF16, ("w", bf16, 1)),
        _spec("Q4_0", 32, "legacy", T.Q4_0, ("qs", u8, 2), ("d", f16, 32)),
        _spec("Q4_1", 32, "legacy", T.Q4_1, ("qs", u8, 2), ("d", f16, 32), ("m", f16, 32)),
        _spec("Q5_0", 32, "legacy", T.Q5_0, ("qs", u8, 2), ("qh", u32, 32), ("d", f16, 32)),
        _spec("Q5_1", 32, "legacy", T.Q5_1, ("qs", u8, 2), ("qh", u32, 32), ("d", f16, 32), ("m", f16, 32)),
        _spec("Q8_0", 32, "legacy", T.Q8_0, ("qs", i8, 1), ("d", f16, 32)),
        _spec("U8M", 32, "legacy", None, ("qs", u8, 1), ("d", f32, 32), ("m", f32, 32)),
        _spec("Q2_K", 256, "k", T.Q2_K, ("qs", u8, 4), ("sc", u8, 16), ("d", f16, 256), ("dmin", f16, 256)),
        _spec("Q3_K", 256, "k", T.Q3_K, ("hmask", u8, 8), ("qs", u8, 4), ("sc", i8, 16), ("d", f16, 256)),
        _spec(
            "Q4_K",
            256,
            "k",
            T.Q4_K,
            ("qs", u8, 2),
            ("sc", u8, 32),
            ("m", u8, 32),
            ("d", f16, 256),
            ("dmin", f16, 256),
        ),
        _spec(
            "Q5_K",
            256,
            "k",
            T.Q5_K,
            ("qs", u8, 2),
            ("qh", u8, 8),
            ("sc", u8, 32),
            ("m", u8, 32),
            ("d", f16, 256),
            ("dmin", f16, 256),
        ),
        _spec("Q6_K", 256, "k", T.Q6_K, ("ql", u8, 2), ("qh", u8, 4), ("sc", i8, 16), ("d", f16, 256)),
        _spec("Q8_K", 256, "k", T.Q8_K, ("qs", i8, 1), ("d", f32, 256)),
        _spec("HQQ4", 64, "hqq", None, ("qs", u8, 2), ("scale", f16, 64), ("zero", f16, 64)),
        _spec("HQQ8", 64, "hqq", None, ("qs", u8, 1), ("scale", f16, 64), ("zero", f16, 64)),
    )
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
