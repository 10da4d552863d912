"""Re-quantize a GGUF file into another GGUF type with jaxrs's own quantizers.

The tensors in-situ quantization would pack are dequantized and quantized again into the format
`jaxrs.quant.isq_format` gives each (the new type, its 32-block fallback for rows it does not divide,
Q8_0 for the embedding and output head); everything else (norms) is copied byte for byte, as is the
metadata. ISQ quantizes each row on its own and llama.cpp's q/k permutation only reorders rows, so the
file loaded `packed=True` holds exactly the weights that `load_model(src, isq=fmt)` builds, in a form
llama.cpp (and any GGUF reader) loads too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.loading.gguf_file import SUPPORTED_TYPES
from jaxrs.loading.gguf_metadata import GGUFFile
from jaxrs.loading.gguf_reader import open_gguf
from jaxrs.quant import FORMATS, QUANTIZED_FORMATS, isq_format, parse_format, quantize, to_gguf_bytes


def gguf_type_of(fmt: str) -> gguf.GGMLQuantizationType:
    """The GGUF storage type for quantized format `fmt`, or a `JaxrsError` saying why there is none."""
    fmt = parse_format(fmt)
    ggml_type = FORMATS[fmt].ggml_type
    if fmt not in QUANTIZED_FORMATS:
        raise JaxrsError(f"{fmt} is not a quantized format; choose one of {', '.join(QUANTIZED_FORMATS)}")
    if ggml_type is None:
        raise JaxrsError(f"{fmt} has no GGUF encoding: write it as a folder (`jaxrs quantize --out DIR`)")
    if ggml_type not in SUPPORTED_TYPES:  # Q8_K: llama.cpp's dot-product intermediate, never stored
        raise JaxrsError(f"{fmt} is not a GGUF weight type that llama.cpp or jaxrs loads from a file")
    return ggml_type


def file_type_of(fmt: str) -> int | None:
    """`general.file_type` for a file of one type (a single-type K-quant is llama.cpp's `_S` mix)."""
    types = gguf.LlamaFileType.__members__
    found = types.get(f"MOSTLY_{fmt}") or types.get(f"MOSTLY_{fmt}_S")
    return int(found) if found is not None else None


def requantize_gguf(src: Path, dst: Path, fmt: str, *, embeddings: str = "q8_0") -> dict[str, Any]:
    """Write `dst`: the GGUF `src` with every tensor ISQ packs re-quantized as ISQ to `fmt` packs it.

    `embeddings`: how the token embedding and output head are stored, as for ISQ (`quant.policy`).
    The file is written beside `dst` and renamed into place, so `dst` is never a partial file.
    Returns what was done: tensors re-quantized and copied, tensor bytes, seconds.
    """
    fmt = parse_format(fmt)
    gguf_type_of(fmt)  # a format GGUF cannot store is refused before anything is read
    start = time.perf_counter()
    reader = open_gguf(src)
    arch = str(reader.metadata["general.architecture"])
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    _copy_metadata(reader, writer, file_type_of(fmt))
    requantized = 0
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        target = isq_format(tensor.name, shape, fmt, embeddings=embeddings)
        if target is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        packed = to_gguf_bytes(quantize(values.reshape(shape), target))
        writer.add_tensor(tensor.name, packed, raw_dtype=gguf_type_of(target))
        requantized += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dst)
    written = open_gguf(dst)
    return {
        "path": str(dst),
        "format": fmt,
        "requantized": requantized,
        "copied": len(reader.tensors) - requantized,
        "tensor_bytes": sum(int(t.n_bytes) for t in written.tensors),
        "seconds": time.perf_counter() - start,
    }


def _copy_metadata(reader: GGUFFile, writer: gguf.GGUFWriter, file_type: int | None) -> None:
    """Every key/value field of `reader` into `writer`, with `general.file_type` set to `file_type`."""
    for key, value in reader.metadata.items():
        if key in ("general.architecture", "general.file_type"):
            continue  # the writer adds the header fields and the architecture itself
        if key == "general.alignment":
            writer.add_custom_alignment(int(value))
            continue
        types = reader.value_types[key]
        sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub)
    if file_type is not None:
        writer.add_file_type(file_type)
