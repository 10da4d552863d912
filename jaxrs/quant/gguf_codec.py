"""GGUF block bytes <-> `QuantizedTensor` (NumPy, vectorized over all blocks at once).

`from_gguf_bytes` cuts each block's fields out of the raw rows and unpacks the 6-bit K-quant scales;
`to_gguf_bytes` is its exact inverse, so a tensor read from a GGUF file saves back byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from jaxrs.errors import JaxrsError
from jaxrs.quant import packing
from jaxrs.quant.formats import FORMATS, format_of_ggml_type
from jaxrs.quant.tensor import QuantizedTensor, make

# byte ranges of each field inside one GGUF block (the scale fields of K-quants are unpacked below)
_BLOCK_FIELDS: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    "Q4_0": (("d", 0, 2, "<f2"), ("qs", 2, 18, "u1")),
    "Q4_1": (("d", 0, 2, "<f2"), ("m", 2, 4, "<f2"), ("qs", 4, 20, "u1")),
    "Q5_0": (("d", 0, 2, "<f2"), ("qh", 2, 6, "<u4"), ("qs", 6, 22, "u1")),
    "Q5_1": (("d", 0, 2, "<f2"), ("m", 2, 4, "<f2"), ("qh", 4, 8, "<u4"), ("qs", 8, 24, "u1")),
    "Q8_0": (("d", 0, 2, "<f2"), ("qs", 2, 34, "i1")),
    "Q2_K": (("sc", 0, 16, "u1"), ("qs", 16, 80, "u1"), ("d", 80, 82, "<f2"), ("dmin", 82, 84, "<f2")),
    "Q3_K": (("hmask", 0, 32, "u1"), ("qs", 32, 96, "u1"), ("scales", 96, 108, "u1"), ("d", 108, 110, "<f2")),
    "Q4_K": (("d", 0, 2, "<f2"), ("dmin", 2, 4, "<f2"), ("scales", 4, 16, "u1"), ("qs", 16, 144, "u1")),
    "Q5_K": (
        ("d", 0, 2, "<f2"),
        ("dmin", 2, 4, "<f2"),
        ("scales", 4, 16, "u1"),
        ("qh", 16, 48, "u1"),
        ("qs", 48, 176, "u1"),
    ),
    "Q6_K": (("ql", 0, 128, "u1"), ("qh", 128, 192, "u1"), ("sc", 192, 208, "i1"), ("d", 208, 210, "<f2")),
    "Q8_K": (("d", 0, 4, "<f4"), ("qs", 4, 260, "i1"), ("bsums", 260, 292, "<i2")),
}


def _byte_shape(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> tuple[int, ...]:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
        raise JaxrsError(
            f"{ggml_type.name} rows must be a multiple of {block} values, got shape {tuple(shape)}"
        )
    return (*shape[:-1], shape[-1] // block * type_size)


def from_gguf_bytes(
    raw: np.ndarray, ggml_type: int | GGMLQuantizationType, shape: Sequence[int]
) -> QuantizedTensor:
    """Repack a GGUF tensor's raw bytes into our layout.

    `shape` is the logical NumPy shape `[..., out, in]` (GGUF's `ne` reversed), rows along `in`.
    F32/F16/BF16 tensors come back as unquantized `QuantizedTensor`s of that format.
    """
    fmt = format_of_ggml_type(ggml_type)
    gtype = GGMLQuantizationType(int(ggml_type))
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise JaxrsError(f"a packed weight needs at least 2 dimensions [out, in], got shape {shape}")
    byte_shape = _byte_shape(shape, gtype)
    raw = np.asarray(raw).view(np.uint8).reshape(-1)
    if raw.size != int(np.prod(byte_shape)):
        need = int(np.prod(byte_shape))
        raise JaxrsError(f"{gtype.name} tensor of shape {shape} needs {need} bytes, got {raw.size}")
    spec = FORMATS[fmt]
    lead = shape[:-1]
    if spec.family == "float":
        (field,) = spec.fields
        return make(fmt, shape[-2:], {field.name: raw.view(field.dtype).reshape(shape).copy()})
    _, type_size = GGML_QUANT_SIZES[gtype]
    blocks = raw.reshape(*lead, -1, type_size)
    parts = {}
    for name, start, stop, dtype in _BLOCK_FIELDS[fmt]:
        parts[name] = np.ascontiguousarray(blocks[..., start:stop]).view(np.dtype(dtype))
    if fmt == "Q3_K":
        parts["sc"] = packing.unpack_scales_q3k(parts.pop("scales"))
    elif fmt in ("Q4_K", "Q5_K"):
        parts["sc"], parts["m"] = packing.unpack_scales_k4(parts.pop("scales"))
    parts.pop("bsums", None)
    arrays = {f.name: parts[f.name].reshape(*lead, -1).astype(f.dtype, copy=False) for f in spec.fields}
    return make(fmt, shape[-2:], arrays)


def to_gguf_bytes(qt: QuantizedTensor) -> np.ndarray:
    """GGUF's bytes for `qt`: uint8 `[..., out, row_bytes]`, the shape `gguf.quants.quantize` gives."""
    spec = qt.spec
    if spec.ggml_type is None:
        raise JaxrsError(f"{qt.fmt} has no GGUF encoding")
    arrays = {n: np.asarray(a) for n, a in qt.arrays.items()}
    lead = qt.shape[:-1]
    if spec.family == "float":
        return arrays["w"].astype(spec.fields[0].dtype).reshape(*lead, -1).view(np.uint8)
    _, type_size = GGML_QUANT_SIZES[spec.ggml_type]
    nblocks = qt.out_in[1] // spec.block
    parts = {n: a.reshape(*lead, nblocks, -1) for n, a in arrays.items()}
    if qt.fmt == "Q3_K":
        parts["scales"] = packing.pack_scales_q3k(parts["sc"])
    elif qt.fmt in ("Q4_K", "Q5_K"):
        parts["scales"] = packing.pack_scales_k4(parts["sc"], parts["m"])
    elif qt.fmt == "Q8_K":
        qs = parts["qs"].astype(np.int16).reshape(*lead, nblocks, 16, 16)
        parts["bsums"] = qs.sum(axis=-1, dtype=np.int16)
    out = np.empty((*lead, nblocks, type_size), np.uint8)
    for name, start, stop, dtype in _BLOCK_FIELDS[qt.fmt]:
        out[..., start:stop] = np.ascontiguousarray(parts[name].astype(dtype)).view(np.uint8)
    return out.reshape(*lead, nblocks * type_size)
