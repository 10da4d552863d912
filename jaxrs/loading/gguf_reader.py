"""Open a GGUF file for loading: its metadata and tensor index (`gguf_metadata.parse_gguf`), and each
tensor's bytes read on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxrs.loading.gguf_metadata import GGUFFile, TensorInfo, parse_gguf


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor index; a missing, truncated or foreign file gets
    one clear error."""
    return parse_gguf(path)


def tensor_data(tensor: Any, path: Path) -> np.ndarray:
    """A copy of one tensor's data (`tensor.data`'s dtype and shape): a GGUF tensor is read with a plain
    file read at its offset, an array (a legacy GGML file's memory-mapped tensor) is copied.

    Reading through a map would leave each page read resident in this process (counted in its RSS
    until the map closes), and an array aliasing the map would keep the whole file mapped."""
    if isinstance(tensor, TensorInfo):
        return tensor.data
    return np.array(tensor.data)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    return reader.metadata
