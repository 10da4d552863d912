"""The packed weight formats' structure-of-arrays layouts: what the kernels read, field by field.

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
  byte per weight, no bit fiddling), which Q4_1, Q5_1, Q4_K and Q5_K move into exactly
  (`jaxrs.quant.transcode`).
- Q8F: qs i8 [I], d f32 [I/32]; w = d*q. No GGUF type: Q8_0 with f32 scales, which Q4_0, Q5_0 and Q8_0
  move into exactly on CPU (XLA:CPU converts a half scale once per weight inside a fused GEMV).
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
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

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
class Layout:
    """A format's arrays, in their canonical order (the order a kernel takes them in)."""

    name: str
    block: int  # quantization block along `in`: `in` must be a multiple of it
    fields: tuple[Field, ...]
    family: str  # "float", "legacy" (32-blocks), "k" (256-superblocks), "hqq"

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def bits_per_weight(self) -> float:
        return sum(8 * f.dtype.itemsize / f.per for f in self.fields)

    def lead_shape(self, arrays: Mapping[str, Any]) -> tuple[int, ...]:
        """The leading (stacked: layers, experts) axes of a packed tensor's `arrays`."""
        return tuple(arrays[self.fields[0].name].shape[:-2])

    def columns(self, arrays: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
        """The entries of each field that hold the weight's columns `start:end` (whole blocks; views)."""
        pers = {f.name: f.per for f in self.fields}
        return {n: v[..., start // pers[n] : end // pers[n]] for n, v in arrays.items()}


def _layout(name: str, block: int, family: str, *fields: tuple[str, np.dtype, int]) -> Layout:
    return Layout(name, block, tuple(Field(*f) for f in fields), family)


LAYOUTS: dict[str, Layout] = {
    s.name: s
    for s in (
        _layout("F32", 1, "float", ("w", f32, 1)),
        _layout("F16", 1, "float", ("w", f16, 1)),
        _layout("BF16", 1, "float", ("w", bf16, 1)),
        _layout("Q4_0", 32, "legacy", ("qs", u8, 2), ("d", f16, 32)),
        _layout("Q4_1", 32, "legacy", ("qs", u8, 2), ("d", f16, 32), ("m", f16, 32)),
        _layout("Q5_0", 32, "legacy", ("qs", u8, 2), ("qh", u32, 32), ("d", f16, 32)),
        _layout("Q5_1", 32, "legacy", ("qs", u8, 2), ("qh", u32, 32), ("d", f16, 32), ("m", f16, 32)),
        _layout("Q8_0", 32, "legacy", ("qs", i8, 1), ("d", f16, 32)),
        _layout("U8M", 32, "legacy", ("qs", u8, 1), ("d", f32, 32), ("m", f32, 32)),
        _layout("Q8F", 32, "legacy", ("qs", i8, 1), ("d", f32, 32)),
        _layout("Q2_K", 256, "k", ("qs", u8, 4), ("sc", u8, 16), ("d", f16, 256), ("dmin", f16, 256)),
        _layout("Q3_K", 256, "k", ("hmask", u8, 8), ("qs", u8, 4), ("sc", i8, 16), ("d", f16, 256)),
        _layout(
            "Q4_K",
            256,
            "k",
            ("qs", u8, 2),
            ("sc", u8, 32),
            ("m", u8, 32),
            ("d", f16, 256),
            ("dmin", f16, 256),
        ),
        _layout(
            "Q5_K",
            256,
            "k",
            ("qs", u8, 2),
            ("qh", u8, 8),
            ("sc", u8, 32),
            ("m", u8, 32),
            ("d", f16, 256),
            ("dmin", f16, 256),
        ),
        _layout("Q6_K", 256, "k", ("ql", u8, 2), ("qh", u8, 4), ("sc", i8, 16), ("d", f16, 256)),
        _layout("Q8_K", 256, "k", ("qs", i8, 1), ("d", f32, 256)),
        _layout("HQQ4", 64, "hqq", ("qs", u8, 2), ("scale", f16, 64), ("zero", f16, 64)),
        _layout("HQQ8", 64, "hqq", ("qs", u8, 1), ("scale", f16, 64), ("zero", f16, 64)),
    )
}
