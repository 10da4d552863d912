"""Qwen2 / Qwen2.5: the Llama layer with q/k/v biases (no o_proj bias), tied or untied embeddings,
optional sliding window on the layers from `max_window_layers` on (`use_sliding_window`).

llama.cpp converts Qwen2 without permuting q/k (its RoPE is already the rotate-half kind).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import FULL, SLIDING, ModelConfig
from jaxrs.models import decoder

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
HF_MODEL_TYPES = ("qwen2",)
GGUF_ARCHITECTURES = ("qwen2",)
GGUF_NAMES = decoder.GGUF_NAMES | {
    f"blk.{{i}}.attn_{p}.bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"
}
GGUF_ROPE_PERMUTED: dict[str, str] = {}


def layer_weights(cfg: ModelConfig) -> dict[str, str]:
    return decoder.layer_weights(cfg, decoder.QKV_BIASES)


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    """Without `layer_types`, the window applies to layers >= max_window_layers (transformers' rule)."""
    if cfg.sliding_window and not raw.get("layer_types"):
        first = raw.get("max_window_layers", 28)
        types = tuple(SLIDING if i >= first else FULL for i in range(cfg.num_layers))
        cfg = dataclasses.replace(cfg, layer_types=types)
    return cfg
