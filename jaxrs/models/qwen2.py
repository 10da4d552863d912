"""Qwen2 / Qwen2.5: the Llama layer with q/k/v biases (no o_proj bias), tied or untied embeddings,
optional sliding window on the layers from `max_window_layers` on (`use_sliding_window`).

llama.cpp converts Qwen2 without permuting q/k (its RoPE is already the rotate-half kind).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import FULL, SLIDING, ModelConfig
from jaxrs.loading.names import LLAMA_GGUF, CheckpointNames
from jaxrs.models.spec import FamilySpec


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    """Without `layer_types`, the window applies to layers >= max_window_layers (transformers' rule)."""
    if cfg.sliding_window and not raw.get("layer_types"):
        first = raw.get("max_window_layers", 28)
        types = tuple(SLIDING if i >= first else FULL for i in range(cfg.num_layers))
        cfg = dataclasses.replace(cfg, layer_types=types)
    return cfg


SPEC = FamilySpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    gguf_architectures=("qwen2",),
    qkv_bias=True,
    finish_hf_config=finish_hf_config,
    names=CheckpointNames(
        gguf=LLAMA_GGUF
        | {f"blk.{{i}}.attn_{p}.bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"}
    ),
)
