"""Zero-copy reading of `.safetensors` files into NumPy (bf16 and fp8 through ml_dtypes).

The safetensors library's NumPy path has no bfloat16, and its JAX path places every tensor on the
default device before we have stacked layers; memory-mapping the documented format directly gives host
arrays of every dtype and lets us check offsets against the file size (a truncated download gets a
clear error instead of a crash mid-load).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxrs.errors import ModelLoadError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One memory-mapped safetensors file: `names`, `get(name) -> np.ndarray`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(self.path, "no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(self.path, "not a safetensors file (shorter than its header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ModelLoadError(
                    self.path, "truncated or not a safetensors file (header runs past the end)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ModelLoadError(self.path, "not a safetensors file (unreadable header)") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            end = entry["data_offsets"][1]
            if self._data_start + end > size:
                raise ModelLoadError(
                    self.path, f"truncated file: tensor {name!r} ends past the end of the file"
                )
            if entry["dtype"] not in DTYPES:
                raise ModelLoadError(self.path, f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
