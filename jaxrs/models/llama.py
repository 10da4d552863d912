"""Llama family (Llama 2/3/3.1, SmolLM, Mistral with or without a sliding window): GQA, RoPE, SwiGLU,
RMSNorm: the shared decoder with no extra pieces, read with Llama's checkpoint names (llama.cpp's q/k row
permutation undone at load).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.loading.names import LLAMA_ROPE_PERMUTED, CheckpointNames
from jaxrs.models.spec import FamilySpec


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    """llama.cpp writes Mixtral as `llama` with an expert count: that one is the MoE family."""
    if not cfg.num_experts:
        return cfg
    return dataclasses.replace(cfg, architecture="mixtral", num_experts_per_tok=cfg.num_experts_per_tok or 2)


SPEC = FamilySpec(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    hf_model_types=("llama", "mistral"),
    gguf_architectures=("llama",),
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(gguf_rope_permuted=LLAMA_ROPE_PERMUTED),
)
