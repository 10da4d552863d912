"""Gemma (1): the Llama layer with GeGLU (tanh GELU), RMSNorm scaling by (1 + w), token embeddings
times sqrt(hidden), head_dim independent of hidden / heads, tied embeddings.

Also the pieces Gemma 2 and 3 share: llama.cpp's converter stores every Gemma norm weight with the +1
folded in (`*norm.weight` + 1, and no q/k permutation), which `from_gguf_tensor` undoes so GGUF files
and HF folders give one parameter tree.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.loading.names import CheckpointNames
from jaxrs.models.spec import FamilySpec


def from_gguf_tensor(name: str, data: np.ndarray) -> np.ndarray:
    """HF-named tensor read from a GGUF file -> the checkpoint's value (norms stored as w + 1)."""
    return data - np.float32(1.0) if name.endswith("norm.weight") else data


def gemma_config(cfg: ModelConfig, raw: dict | None, **changes) -> ModelConfig:
    """What every Gemma has: (1 + w) norms, embeddings times sqrt(hidden); from a config.json (`raw`),
    tied embeddings unless it says otherwise (transformers' default for Gemma)."""
    if raw is not None:
        changes["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True))
    return dataclasses.replace(cfg, norm_offset=1.0, embedding_scale=cfg.hidden_size**0.5, **changes)


def llama_cpp_query_scalar(cfg: ModelConfig, layers_27b: int) -> float:
    """llama.cpp's Gemma 2/3 query scale: hidden / heads for the 27B model, head_dim otherwise (the GGUF
    does not carry `query_pre_attn_scalar`)."""
    return cfg.hidden_size / cfg.num_heads if cfg.num_layers == layers_27b else cfg.head_dim


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    # Official configs say hidden_act "gelu" and mean the tanh approximation (transformers rewrites it).
    return gemma_config(cfg, raw, hidden_act="gelu_tanh" if cfg.hidden_act == "gelu" else cfg.hidden_act)


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    return gemma_config(cfg, None, hidden_act="gelu_tanh")


SPEC = FamilySpec(
    name="gemma",
    hf_architectures=("GemmaForCausalLM",),
    hf_model_types=("gemma",),
    gguf_architectures=("gemma",),
    finish_hf_config=finish_hf_config,
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(from_gguf_tensor=from_gguf_tensor),
)
