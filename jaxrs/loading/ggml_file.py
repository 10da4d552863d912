"""Legacy GGML files (llama.cpp before GGUF: unversioned `ggml`, `ggmf` v1, `ggjt` v1-v3), Llama only.

The file is read into the shape of a GGUF file (llama.cpp's metadata keys, today's tensor names, the
same tensor records), so the GGUF loader maps it onto the model with no second path. Quantized
tensors load from `ggjt` v3, whose block layouts are GGUF's; older quantized layouts are refused.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from jaxrs.errors import ModelLoadError

MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # the uint32 magic, little-endian bytes
LOADABLE = {QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
NAMES = {  # GGML-era llama.cpp tensor names -> GGUF names
    r"tok_embeddings\.weight": "token_embd.weight",
    r"norm\.weight": "output_norm.weight",
    r"output\.weight": "output.weight",
    r"layers\.(\d+)\.attention\.wq\.weight": r"blk.\1.attn_q.weight",
    r"layers\.(\d+)\.attention\.wk\.weight": r"blk.\1.attn_k.weight",
    r"layers\.(\d+)\.attention\.wv\.weight": r"blk.\1.attn_v.weight",
    r"layers\.(\d+)\.attention\.wo\.weight": r"blk.\1.attn_output.weight",
    r"layers\.(\d+)\.attention_norm\.weight": r"blk.\1.attn_norm.weight",
    r"layers\.(\d+)\.ffn_norm\.weight": r"blk.\1.ffn_norm.weight",
    r"layers\.(\d+)\.feed_forward\.w1\.weight": r"blk.\1.ffn_gate.weight",
    r"layers\.(\d+)\.feed_forward\.w2\.weight": r"blk.\1.ffn_down.weight",
    r"layers\.(\d+)\.feed_forward\.w3\.weight": r"blk.\1.ffn_up.weight",
}


def is_ggml(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in MAGICS


@dataclasses.dataclass
class GGMLTensor:
    """The fields of `gguf.ReaderTensor` the GGUF loader reads."""

    name: str
    tensor_type: QT
    shape: list[int]  # ne order (innermost first), as GGUF readers give it
    data: np.ndarray


@dataclasses.dataclass
class GGMLFile:
    metadata: dict[str, Any]  # in GGUF's keys
    tensors: list[GGMLTensor]


def feed_forward_length(n_embd: int, n_mult: int) -> int:
    """How GGML-era llama.cpp derived the FFN width from `n_mult`."""
    return ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult


def read_ggml(path: Path) -> GGMLFile:
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ModelLoadError(path, "truncated GGML file (ends inside its header)")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    kind = MAGICS.get(bytes(raw[:4]))
    if kind is None:
        raise ModelLoadError(path, "not a GGML file")
    pos = 4
    version = take("<I")[0] if kind != "ggml" else 0
    n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype = take("<7i")
    tokens, scores = [], []
    for _ in range(n_vocab):
        (length,) = take("<I")
        text = bytes(raw[pos : pos + length])
        pos += length
        tokens.append(text)
        scores.append(take("<f")[0] if kind != "ggml" else 0.0)
    tensors = []
    while pos < len(raw):
        n_dims, name_len, ttype = take("<3i")
        dims = list(take(f"<{n_dims}i"))
        name = bytes(raw[pos : pos + name_len]).decode("utf-8", errors="replace")
        pos += name_len
        if kind == "ggjt":
            pos += -pos % 32  # tensor data is 32-byte aligned
        try:
            qtype = QT(ttype)
        except ValueError:
            raise ModelLoadError(path, f"tensor {name!r} has unknown GGML type {ttype}") from None
        if qtype not in LOADABLE or (qtype not in (QT.F32, QT.F16) and (kind, version) != ("ggjt", 3)):
            raise ModelLoadError(
                path,
                f"tensor {name!r} is {qtype.name} in a {kind} v{version} file; jaxrs loads F32/F16 from "
                "any GGML file and Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 from ggjt v3 (convert older files to GGUF)",
            )
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        rows, row_len = int(np.prod(dims[1:])), dims[0]
        nbytes = rows * row_len // block * block_bytes
        if pos + nbytes > len(raw):
            raise ModelLoadError(path, f"truncated GGML file: tensor {name!r} runs past the end")
        data = raw[pos : pos + nbytes]
        if qtype == QT.F32:
            data = data.view(np.float32).reshape(rows, row_len)
        elif qtype == QT.F16:
            data = data.view(np.float16).reshape(rows, row_len)
        else:
            data = data.reshape(rows, nbytes // rows)
        pos += nbytes
        tensors.append(GGMLTensor(_gguf_name(name, path), qtype, dims, data))
    metadata = {
        "general.architecture": "llama",
        "general.name": path.stem,
        "llama.vocab_size": n_vocab,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": feed_forward_length(n_embd, n_mult),
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head,
        "llama.block_count": n_layer,
        "llama.rope.dimension_count": n_rot,
        "llama.context_length": 2048,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        **_sentencepiece_metadata(tokens, scores),
    }
    return GGMLFile(metadata, tensors)


def _gguf_name(name: str, path: Path) -> str:
    for pattern, target in NAMES.items():
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise ModelLoadError(path, f"unknown GGML tensor {name!r} (jaxrs reads GGML files of Llama models only)")


def _sentencepiece_metadata(tokens: list[bytes], scores: list[float]) -> dict[str, Any]:
    """GGUF tokenizer keys for a GGML vocabulary: GGML-era llama.cpp stored SentencePiece pieces with
    '▁' written as a space, byte pieces as the byte itself, and control pieces empty."""
    pieces, types = [], []
    for i, text in enumerate(tokens):
        if i in (0, 1, 2):  # <unk>, <s>, </s>
            pieces.append(("<unk>", "<s>", "</s>")[i])
            types.append(2 if i == 0 else 3)
        elif len(text) == 1 and text[0] == i - 3:  # llama's byte pieces <0x00>..<0xFF> sit at ids 3..258
            pieces.append(f"<0x{text[0]:02X}>")
            types.append(6)
        else:
            pieces.append(text.decode("utf-8", errors="replace").replace(" ", "\u2581"))
            types.append(1)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
