"""Which tensors in-situ quantization (ISQ) packs, and which stay in the model's float dtype."""

from __future__ import annotations

from collections.abc import Sequence

from jaxrs.quant.formats import spec

# Embedding tables and the output head: quantized only when asked (they dominate small models' size,
# but are the most sensitive to error and the embedding is a gather, not a matmul).
EMBEDDING_NAMES = ("embed_tokens", "token_embd", "wte", "word_embeddings", "lm_head", "output.weight")
# Never packed: normalization weights, MoE routers (tiny and precision-sensitive).
SKIP_NAMES = ("norm", "ffn_gate_inp", "router", ".gate.weight")


def should_quantize(name: str, shape: Sequence[int], fmt: str = "Q4_K", *, embeddings: bool = False) -> bool:
    """Whether ISQ packs parameter `name` of `shape` (`[..., out, in]`) into `fmt`.

    Rule: only matrices are packed. Left as they are: 1-D tensors (biases, norm weights), anything
    named like a norm, bias or MoE router, tensors whose `in` (last) dimension is not a multiple of
    the format's block (32 for Q4_0..Q8_0, 256 for K-quants, 64 for HQQ), and, unless `embeddings`,
    the token embedding and output head.
    """
    lowered = name.lower()
    if len(shape) < 2 or lowered.endswith("bias") or any(s in lowered for s in SKIP_NAMES):
        return False
    # names match from a dot on: GGUF's `output.weight` is the head, `blk.0.attn_output.weight` is not
    if not embeddings and any(f".{s}" in f".{lowered}" for s in EMBEDDING_NAMES):
        return False
    return shape[-1] % spec(fmt).block == 0
