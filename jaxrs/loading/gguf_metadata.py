"""A GGUF file's header, key/value metadata and tensor index, parsed straight from its bytes.

`gguf.GGUFReader` builds a NumPy array (and several Python objects) for every element of every array
field: for a 150-262k token vocabulary that is 5-17 s of CPU and hundreds of MiB per open. Here an array
of strings is decoded in one pass into a `list[str]` and an array of numbers in one `np.frombuffer`, so
opening any GGUF takes well under a second. Tensor data is not touched: `TensorInfo.data` reads one
tensor with a plain file read when asked (`gguf.quants` still (de)quantizes it).

The layout (llama.cpp's `gguf.h`, versions 2 and 3, little-endian): magic `GGUF`, u32 version, u64 tensor
count, u64 key/value count; each key/value is a string key, a u32 value type and the value (a string is a
u64 length and UTF-8 bytes; an array is a u32 element type, a u64 count and the elements); each tensor
info is a string name, u32 dimension count, u64 dimensions (innermost first), u32 storage type and u64
offset from the data section, which starts at the next multiple of `general.alignment` (32 by default).
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from jaxrs.errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Fixed-size value types: struct format (little-endian) and NumPy dtype.
_SCALARS: dict[GGUFValueType, tuple[str, np.dtype]] = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<?", np.dtype("?")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}

# How `gguf.GGUFReader` exposes a tensor's data: these types as typed elements, all others as bytes.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file and how it is stored (the fields of `gguf.ReaderTensor`)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ne order (innermost first), as GGUF stores it
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    path: Path = dataclasses.field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """The tensor's stored data, read now (a copy, not a view of a map): typed elements for float and
        integer types, else bytes with the last dimension in bytes per row; shape outermost first."""
        dims = tuple(reversed(self.shape))
        element = _ELEMENT_DTYPES.get(self.tensor_type)
        raw = np.fromfile(self.path, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset)
        if raw.size != self.n_bytes:
            raise ModelLoadError(self.path, f"truncated GGUF file: tensor {self.name!r} is cut short")
        if element is not None:
            return raw.view(element).reshape(dims)
        block, type_size = GGML_QUANT_SIZES[self.tensor_type]
        return raw.reshape(*dims[:-1], dims[-1] // block * type_size)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of a 2-D tensor's stored bytes, read now: uint8 `[rows, bytes per row]`."""
        if len(self.shape) != 2:
            raise ValueError(f"tensor {self.name!r} is not 2-D")
        row_bytes = self.n_bytes // self.shape[1]
        count = (stop - start) * row_bytes
        raw = np.fromfile(self.path, dtype=np.uint8, count=count, offset=self.data_offset + start * row_bytes)
        if raw.size != count:
            raise ModelLoadError(self.path, f"truncated GGUF file: tensor {self.name!r} is cut short")
        return raw.reshape(stop - start, row_bytes)


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata as plain Python values and its tensor index."""

    path: Path
    version: int
    metadata: dict[str, Any]  # strings, numbers, bools; arrays as lists (of str, numbers or lists)
    value_types: dict[str, tuple[GGUFValueType, ...]]  # e.g. (ARRAY, STRING): what a writer needs
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # where the tensor data section begins


class _Corrupt(Exception):
    """A problem found while parsing; `parse_gguf` adds the file name and the place."""


class _Parser:
    """Reads values from the file's bytes at a moving position, checking every length against the end."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(
                f"truncated GGUF file: {what} needs {n} bytes at byte {self.pos}, the file has {self.size}"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        start = self.pos
        self.pos += n
        return str(self.buf[start : self.pos], "utf-8", "replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str) -> tuple[Any, tuple[GGUFValueType, ...]]:
        """One value of type `vtype` and the types it is made of (`(ARRAY, STRING)` for a list of str)."""
        if vtype == GGUFValueType.STRING:
            return self.string(what), (vtype,)
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[vtype][0], what), (vtype,)
        element = self.value_type(what)
        count = self.scalar("<Q", what)
        if element == GGUFValueType.STRING:
            return self.strings(count, what), (vtype, element)
        if element == GGUFValueType.ARRAY:
            items, inner = [], (element,)
            for i in range(count):
                item, inner = self.value(element, f"{what}[{i}]")
                items.append(item)
            return items, (vtype, *inner)
        dtype = _SCALARS[element][1]
        self.need(count * dtype.itemsize, f"{what} ({count} elements)")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return values.tolist(), (vtype, element)

    def strings(self, count: int, what: str) -> list[str]:
        """`count` length-prefixed strings in one pass; each length is checked against the file's end."""
        # Each string takes at least its 8-byte length: a count the file cannot hold is corrupt.
        self.need(count * 8, f"{what} ({count} strings)")
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                break
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        if len(out) < count:
            raise _Corrupt(
                f"truncated GGUF file: {what}: string {len(out)} of {count} runs past the end of the file "
                f"({size} bytes)"
            )
        self.pos = pos
        return out


def parse_gguf(path: str | Path) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor index; a missing, foreign, truncated or corrupt file
    raises one `ModelLoadError` naming the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != MAGIC:
            raise ModelLoadError(path, f"not a GGUF file (magic bytes {magic!r}, expected {MAGIC!r})")
        # The map is closed before returning: the pages read (the vocabulary) do not stay resident.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(_Parser(buf), path)
            except _Corrupt as e:
                raise ModelLoadError(path, str(e)) from None
            except struct.error as e:  # a length so wrong that it runs past the end
                raise ModelLoadError(path, f"truncated or corrupt GGUF file ({e})") from None


def _parse(p: _Parser, path: Path) -> GGUFFile:
    p.pos = 4
    version = p.scalar("<I", "the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise _Corrupt(f"a big-endian GGUF file (version {swapped}); only little-endian files load")
        raise _Corrupt(f"unsupported GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
    n_tensors = p.scalar("<Q", "the tensor count")
    n_kv = p.scalar("<Q", "the key/value count")
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[GGUFValueType, ...]] = {}
    for i in range(n_kv):
        key = p.string(f"the name of key/value #{i}")
        where = f"metadata key {key!r}"
        metadata[key], types[key] = p.value(p.value_type(where), where)
    infos, seen = [], set()
    for i in range(n_tensors):
        name = p.string(f"the name of tensor #{i}")
        where = f"tensor {name!r}"
        n_dims = p.scalar("<I", where)
        p.need(8 * n_dims, where)
        dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", p.buf, p.pos))
        p.pos += 8 * n_dims
        raw_type = p.scalar("<I", where)
        offset = p.scalar("<Q", where)
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise _Corrupt(f"{where} has unknown storage type {raw_type}") from None
        if name in seen:
            raise _Corrupt(f"tensor {name!r} is listed twice")
        seen.add(name)
        infos.append((name, ttype, dims, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment} is not a power of two")
    data_start = -(-p.pos // alignment) * alignment
    tensors = []
    for name, ttype, dims, offset in infos:
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[ttype]
        if dims and dims[0] % block:
            raise _Corrupt(
                f"tensor {name!r}: rows of {dims[0]} values do not divide into {ttype.name} blocks"
            )
        n_bytes = n_elements // block * type_size
        start = data_start + offset
        if start + n_bytes > p.size:
            raise _Corrupt(
                f"truncated GGUF file: tensor {name!r} ends at byte {start + n_bytes}, "
                f"the file has {p.size} bytes"
            )
        tensors.append(TensorInfo(name, ttype, dims, n_elements, n_bytes, start, path))
    return GGUFFile(path, version, metadata, types, tensors, alignment, data_start)
