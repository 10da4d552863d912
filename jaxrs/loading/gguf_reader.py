"""Read a GGUF file's metadata and tensor index with `gguf.GGUFReader`, turning its failures into
`ModelLoadError`s that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxrs.errors import ModelLoadError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file (memory-mapped); a missing, truncated or foreign file gets one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(path, f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise ModelLoadError(path, f"truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(
                path,
                f"truncated GGUF file: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size} bytes",
            )
    return reader


def tensor_data(tensor: Any, path: Path) -> np.ndarray:
    """A copy of one tensor's data (`tensor.data`'s dtype and shape), read from `path` with a plain file
    read when the tensor says where it lies (`gguf.ReaderTensor`), else copied out of its memory map.

    Reading through the map would leave each page read resident in this process (counted in its RSS
    until the map closes), and an array aliasing the map would keep the whole file mapped."""
    view = tensor.data
    offset = getattr(tensor, "data_offset", None)
    if offset is None:
        return np.array(view)
    raw = np.fromfile(path, dtype=np.uint8, count=view.nbytes, offset=offset)
    return raw.view(view.dtype).reshape(view.shape)


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field_value(field)
    return out


def field_value(field: gguf.ReaderField) -> Any:
    """A field's value; arrays of numbers come back as lists, strings decoded as UTF-8."""
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        arr = np.concatenate([field.parts[i] for i in field.data])
        return arr.tolist()
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]
