"""Which format in-situ quantization (ISQ) packs each tensor in, or whether it stays in the float dtype.

One rule for every ISQ path (`--isq` at load, `jaxrs quantize`, runtime re-quantization, GGUF export):

- Matrices take the requested format. A matrix whose row length (`in`, the last dimension) does not
  divide by the format's block takes a fallback format with a 32-block instead, as llama.cpp's quantizer
  does (`FALLBACK`); only if the row does not divide by that block either does it stay float. Without
  this, every 576-wide matrix of a model like SmolLM2 stays f32 under a K-quant.
- The token embedding and output head (the largest tensors of a small model) are packed compactly:
  Q8_0 by default (`EMBEDDINGS`).
- Norms, biases, MoE routers and other 1-D tensors stay float (tiny and precision-sensitive).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxrs.errors import JaxrsError
from jaxrs.quant.formats import parse_format, spec

# llama.cpp's `llama_tensor_get_type` fallback when `ne[0]` does not divide by the block: a 32-block
# format of about the same bits (IQ4_NL for Q2_K/Q3_K there, which jaxrs lacks: Q4_0 has its size).
# HQQ's 64-groups fall back to the 32-block format of the same bits per weight.
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "Q8_K": "Q8_0",
    "HQQ4": "Q4_0",
    "HQQ8": "Q8_0",
}

# How ISQ stores the embedding table and output head: "q8_0" (the default; under a float format such as
# F16, that format), "isq" (the format the matrix rule gives them, when it has fewer bits than Q8_0), or
# "float" (left in the model's dtype).
EMBEDDINGS = ("q8_0", "isq", "float")
EMBEDDING_FORMAT = "Q8_0"
EMBEDDING_NAMES = ("embed_tokens", "token_embd", "wte", "word_embeddings", "lm_head", "output.weight")
# Never packed: normalization weights, MoE routers (tiny and precision-sensitive).
NORM_NAMES = ("norm",)
ROUTER_NAMES = ("ffn_gate_inp", "router", ".gate.weight")


@dataclasses.dataclass(frozen=True)
class IsqChoice:
    """What ISQ does with one tensor: the format it is packed in (None: stays float) and why, when that
    is not simply the requested format (the reason groups tensors in the ISQ summary line)."""

    fmt: str | None
    reason: str = ""


def isq_format(name: str, shape: Sequence[int], fmt: str, *, embeddings: str = "q8_0") -> str | None:
    """The format ISQ packs tensor `name` of `shape` (`[..., out, in]`) in when asked for `fmt`, or None
    if it stays float. See the module docstring for the rule and `isq_choice` for the reason."""
    return isq_choice(name, shape, fmt, embeddings=embeddings).fmt


def isq_choice(name: str, shape: Sequence[int], fmt: str, *, embeddings: str = "q8_0") -> IsqChoice:
    """`isq_format` with the reason for the choice."""
    fmt, embeddings = parse_format(fmt), check_embeddings(embeddings)
    lowered = name.lower()
    if len(shape) < 2 or lowered.endswith("bias") or any(s in lowered for s in NORM_NAMES):
        return IsqChoice(None, "norms, biases")
    if any(s in lowered for s in ROUTER_NAMES):
        return IsqChoice(None, "routers")
    # names match from a dot on: GGUF's `output.weight` is the head, `blk.0.attn_output.weight` is not
    if any(f".{s}" in f".{lowered}" for s in EMBEDDING_NAMES):
        return _embedding_choice(shape[-1], fmt, embeddings)
    return _matrix_choice(shape[-1], fmt)


def check_embeddings(embeddings: str) -> str:
    """`embeddings` if it is one of `EMBEDDINGS`, else a `JaxrsError` listing them."""
    if embeddings not in EMBEDDINGS:
        raise JaxrsError(f"ISQ embeddings must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}")
    return embeddings


def _matrix_choice(row: int, fmt: str) -> IsqChoice:
    """`fmt` if `row` divides by its block, else the first format down its fallback chain that fits."""
    wanted = fmt
    while row % spec(fmt).block:
        if fmt not in FALLBACK:
            return IsqChoice(None, f"row length not a multiple of {spec(fmt).block}")
        fmt = FALLBACK[fmt]
    return IsqChoice(fmt, "" if fmt == wanted else f"row length not a multiple of {spec(wanted).block}")


def _embedding_choice(row: int, fmt: str, embeddings: str) -> IsqChoice:
    """The embedding / head: compact (Q8_0) unless kept float, or the matrix rule's format if asked for
    and smaller; under a float ISQ format (F16...) the same float format, never fewer bits."""
    reason = "embedding, head"
    if embeddings == "float":
        return IsqChoice(None, reason)
    if spec(fmt).family == "float":
        return IsqChoice(fmt, reason)
    if embeddings == "isq":
        matrix = _matrix_choice(row, fmt).fmt
        if matrix and spec(matrix).bits_per_weight() < spec(EMBEDDING_FORMAT).bits_per_weight():
            return IsqChoice(matrix, reason)
    if row % spec(EMBEDDING_FORMAT).block:
        return IsqChoice(None, f"{reason}; row length not a multiple of {spec(EMBEDDING_FORMAT).block}")
    return IsqChoice(EMBEDDING_FORMAT, reason)
