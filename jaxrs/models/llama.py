"""Llama family (Llama 2/3/3.1, SmolLM, Mistral with or without a sliding window): GQA, RoPE, SwiGLU,
RMSNorm. The layer itself is the shared decoder (`jaxrs.models.decoder`); this file says which
checkpoints it reads and how.
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.models.decoder import ATTENTION_BIASES, GGUF_NAMES, LAYER_WEIGHTS, MLP_BIASES  # noqa: F401

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPES = ("llama", "mistral")  # config.json `model_type`, when `architectures` is absent
GGUF_ARCHITECTURES = ("llama",)

# llama.cpp permutes q/k rows for its interleaved RoPE; the loader undoes it (value: heads to use).
GGUF_ROPE_PERMUTED = {"blk.{i}.attn_q.weight": "num_heads", "blk.{i}.attn_k.weight": "num_kv_heads"}


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    """llama.cpp writes Mixtral as `llama` with an expert count: that one is the MoE family."""
    if not cfg.num_experts:
        return cfg
    return dataclasses.replace(cfg, architecture="mixtral", num_experts_per_tok=cfg.num_experts_per_tok or 2)
