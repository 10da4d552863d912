"""A GGUF file: metadata -> ModelConfig, llama.cpp tensor names -> the family's HF names.

Tensors are dequantized with `gguf.quants` as they are requested (one layer's worth at a time), so
peak host memory stays near the finished parameter tree. The getter is the seam where packed
(quantized-on-device) tensors will plug in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from gguf import GGMLQuantizationType as QT

from jaxrs.config import ModelConfig
from jaxrs.errors import ModelLoadError
from jaxrs.loading.checkpoint import hf_weight_names, take
from jaxrs.loading.gguf_metadata import GGUFFile, TensorInfo
from jaxrs.loading.gguf_reader import tensor_data
from jaxrs.loading.layer_stack import aligned_empty
from jaxrs.loading.model_config import config_from_gguf
from jaxrs.models.registry import family
from jaxrs.quant import QuantizedTensor, from_gguf_bytes

# Storage types that load (dequantized by gguf.quants).
SUPPORTED_TYPES = {
    QT.F32,
    QT.F16,
    QT.BF16,
    QT.Q4_0,
    QT.Q4_1,
    QT.Q5_0,
    QT.Q5_1,
    QT.Q8_0,
    QT.Q2_K,
    QT.Q3_K,
    QT.Q4_K,
    QT.Q5_K,
    QT.Q6_K,
}


def gguf_config(reader: GGUFFile, meta: dict[str, Any], path: Path) -> ModelConfig:
    by_name = {t.name: t for t in reader.tensors}

    def values(name: str) -> tuple[float, ...] | None:
        """A small f32 tensor that is configuration (RoPE frequency factors), as a tuple."""
        if name not in by_name:
            return None
        return tuple(float(x) for x in np.asarray(by_name[name].data, dtype=np.float32).reshape(-1))

    long, short = values("rope_factors_long.weight"), values("rope_factors_short.weight")
    return config_from_gguf(
        meta,
        path,
        has_output="output.weight" in by_name,
        rope_freqs=values("rope_freqs.weight"),
        rope_factors=None if long is None or short is None else (long, short),
    )


def _template(name: str) -> re.Pattern:
    """A name template with a `{i}` layer index (and optionally an `{e}` expert index) as a regex."""
    pattern = re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + pattern + "$")


def _name_patterns(names: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(_template(k), v) for k, v in names.items()]


def _translate(name: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in patterns:
        if m := pattern.match(name):
            for key, value in m.groupdict().items():
                target = target.replace(f"{{{key}}}", value)
            return target
    return None


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}


def open_gguf_tensors(
    reader: GGUFFile,
    cfg: ModelConfig,
    path: Path,
    *,
    packed: bool = False,
    relayout: Callable[[QuantizedTensor], QuantizedTensor] | None = None,
) -> Callable[[str], np.ndarray | QuantizedTensor]:
    """A getter of HF-named tensors backed by the GGUF file: f32 arrays, or with `packed`, quantized
    tensors kept in their GGUF format (bit-exact with the file) as `QuantizedTensor`s, or moved by
    `relayout` (row by row: e.g. `quant.transcode.cpu_layout`).

    A 2-D packed tensor over `SLICED_ABOVE` bytes (a large embedding or head) is read `CHUNK_BYTES` of
    rows at a time into its final, aligned buffers (`read_in_row_chunks`): its file bytes, its fields
    and its relaid fields never exist whole at once.

    A family's `names.gguf_split(cfg)` names llama.cpp tensors that hold several HF tensors (Phi-2's fused
    `attn_qkv`, Mixtral's 3-D `ffn_*_exps`): each part is a row range or a leading index of it (see
    `checkpoint.take`); the whole tensor is read once and kept until its last part has been asked for.
    """
    names = family(cfg.architecture).names
    patterns = _name_patterns(names.gguf)
    permuted = {p: getattr(cfg, attr) for p, attr in _name_patterns(names.gguf_rope_permuted)}
    fix = names.from_gguf_tensor  # e.g. Gemma: norms were stored as weight + 1
    split = names.gguf_split(cfg) if names.gguf_split else {}
    split_patterns = [(_template(k), parts) for k, parts in split.items()]
    by_hf_name: dict[str, tuple[TensorInfo, int | None, int | slice | None]] = {}
    parts_left: dict[str, int] = {}  # split GGUF tensor -> parts not yet asked for
    for tensor in reader.tensors:
        if (hf := _translate(tensor.name, patterns)) is not None:
            heads = next((h for p, h in permuted.items() if p.match(tensor.name)), None)
            by_hf_name[hf] = (tensor, heads, None)
            continue
        for pattern, parts in split_patterns:
            if m := pattern.match(tensor.name):
                for target, index in parts:
                    by_hf_name[target.replace("{i}", m.group("i"))] = (tensor, None, index)
                parts_left[tensor.name] = len(parts)
                break
    missing = [n for n in hf_weight_names(cfg) if n not in by_hf_name]
    if missing:
        to_gguf = _name_patterns({v: k for k, v in names.gguf.items()})
        shown = [_translate(n, to_gguf) or n for n in missing[:3]]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(path, f"missing tensor(s) {', '.join(shown)}{more}")

    whole: dict[str, np.ndarray | QuantizedTensor] = {}

    def get(name: str) -> np.ndarray | QuantizedTensor:
        tensor, heads, index = by_hf_name[name]
        if index is None:
            data = read(tensor, heads)
        else:
            if tensor.name not in whole:
                whole[tensor.name] = read(tensor, None)
            data = take(whole[tensor.name], index)
            parts_left[tensor.name] -= 1
            if parts_left[tensor.name] == 0:
                del whole[tensor.name]
        return fix(name, data) if fix and not isinstance(data, QuantizedTensor) else data

    def read(tensor: TensorInfo, heads: int | None) -> np.ndarray | QuantizedTensor:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                path,
                f"tensor {tensor.name!r} has storage type {tensor.tensor_type.name}, which jaxrs cannot "
                f"load (supported: {', '.join(t.name for t in sorted(SUPPORTED_TYPES))})",
            )
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        if packed and tensor.tensor_type not in FLOAT_TYPES:
            if heads is None and isinstance(tensor, TensorInfo) and tensor.n_bytes > SLICED_ABOVE:
                return read_in_row_chunks(tensor, relayout)
            qt = from_gguf_bytes(tensor_data(tensor, path), tensor.tensor_type, shape)
            # Rows are independent in every format, so the q/k row permutation applies to each array.
            qt = jax.tree.map(lambda a: unpermute_rope(a, heads), qt) if heads else qt
            return relayout(qt) if relayout else qt
        raw = tensor_data(tensor, path)
        data = gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32, copy=False)
        return unpermute_rope(data.reshape(shape), heads) if heads else data.reshape(shape)

    return get


# Packed tensors over SLICED_ABOVE bytes (the embedding and head of a large vocabulary) are read CHUNK_BYTES
# of rows at a time. Measured: 16 MiB slices left 2.6x the Qwen2.5-0.5B embedding's size resident at its
# peak, 1 MiB slices 1.1x, and ran faster. Slicing the demo's 30 MB embedding gained nothing at its peak
# (which comes while serving), so smaller tensors are read whole.
CHUNK_BYTES = 2**20
SLICED_ABOVE = 64 * 2**20


def read_in_row_chunks(
    tensor: TensorInfo, relayout: Callable[[QuantizedTensor], QuantizedTensor] | None = None
) -> QuantizedTensor:
    """A 2-D packed tensor read `CHUNK_BYTES` of rows at a time, each slice repacked (and relaid) and
    written into 64-byte aligned field buffers, which on CPU become the device arrays without a copy."""
    out, cols = int(tensor.shape[1]), int(tensor.shape[0])
    step = max(1, CHUNK_BYTES // (tensor.n_bytes // out))
    fields: dict[str, np.ndarray] = {}
    fmt = ""
    for start in range(0, out, step):
        stop = min(out, start + step)
        part = from_gguf_bytes(tensor.rows(start, stop), tensor.tensor_type, (stop - start, cols))
        part = relayout(part) if relayout else part
        if not fields:
            fmt = part.fmt
            fields = {n: aligned_empty((out, *a.shape[1:]), a.dtype) for n, a in part.arrays.items()}
        for name, buffer in fields.items():
            buffer[start:stop] = part.arrays[name]
    return QuantizedTensor(fmt, (out, cols), fields)
