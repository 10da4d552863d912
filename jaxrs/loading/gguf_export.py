"""Re-quantize a GGUF file into another GGUF type with jaxrs's own quantizers.

The tensors in-situ quantization would pack (`jaxrs.quant.should_quantize`) are dequantized and
quantized again into the new type; everything else (norms, and by default the embedding and output
head) is copied byte for byte, as is the metadata. ISQ quantizes each row on its own and llama.cpp's
q/k permutation only reorders rows, so the file loaded `packed=True` holds exactly the weights that
`load_model(src, isq=fmt)` builds, in a form llama.cpp (and any GGUF reader) loads too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.loading.gguf_file import SUPPORTED_TYPES
from jaxrs.loading.gguf_reader import open_gguf
from jaxrs.quant import FORMATS, QUANTIZED_FORMATS, parse_format, quantize, should_quantize, to_gguf_bytes


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


def requantize_gguf(src: Path, dst: Path, fmt: str, *, embeddings: bool = False) -> dict[str, Any]:
    """Write `dst`: the GGUF `src` with every tensor ISQ packs re-quantized into `fmt`.

    `embeddings`: also re-quantize the token embedding and output head (as ISQ does when asked).
    The file is written beside `dst` and renamed into place, so `dst` is never a partial file.
    Returns what was done: tensors re-quantized and copied, tensor bytes, seconds.
    """
    fmt = parse_format(fmt)
    ggml_type = gguf_type_of(fmt)
    start = time.perf_counter()
    reader = open_gguf(src)
    arch = str(reader.fields["general.architecture"].contents())
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    _copy_metadata(reader, writer, file_type_of(fmt))
    requantized = 0
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        if not should_quantize(tensor.name, shape, fmt, embeddings=embeddings):
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(
            tensor.name, to_gguf_bytes(quantize(values.reshape(shape), fmt)), raw_dtype=ggml_type
        )
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


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: int | None) -> None:
    """Every key/value field of `reader` into `writer`, with `general.file_type` set to `file_type`."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer adds the header fields and the architecture itself
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    if file_type is not None:
        writer.add_file_type(file_type)
