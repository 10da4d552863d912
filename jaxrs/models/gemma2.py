"""Gemma 2: Gemma with norms on both sides of attention and MLP, attention-score and final-logit
soft-capping, sliding-window layers alternating with global ones, query scale from
`query_pre_attn_scalar`.
"""

from __future__ import annotations

from jaxrs.config import ACTIVATIONS, ModelConfig, pattern_layer_types
from jaxrs.loading.names import LLAMA_GGUF, SANDWICH_NORMS_HF, CheckpointNames, hf_table
from jaxrs.models.gemma import from_gguf_tensor, gemma_config, llama_cpp_query_scalar
from jaxrs.models.spec import FamilySpec

GGUF_NAMES = LLAMA_GGUF | {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}


def finish_hf_config(cfg: ModelConfig, raw: dict, *, pattern: int = 2, **defaults) -> ModelConfig:
    """transformers' Gemma 2 defaults for keys a config.json leaves out (it reads only
    `hidden_activation`, not `hidden_act`)."""
    defaults = {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    } | defaults
    get = {k: raw.get(k, v) for k, v in defaults.items()}
    types = cfg.layer_types or pattern_layer_types(cfg.num_layers, raw.get("sliding_window_pattern", pattern))
    return gemma_config(
        cfg,
        raw,
        hidden_act=ACTIVATIONS[get["hidden_activation"] or "gelu_pytorch_tanh"],
        sliding_window=get["sliding_window"],
        layer_types=types,
        query_pre_attn_scalar=get["query_pre_attn_scalar"],
        attn_logit_softcap=get["attn_logit_softcapping"],
        final_logit_softcap=get["final_logit_softcapping"],
    )


def finish_gguf_config(
    cfg: ModelConfig, meta: dict, *, pattern: int = 2, layers_27b: int = 46
) -> ModelConfig:
    """llama.cpp's Gemma 2 defaults: window 4096, every other layer sliding, caps 50 / 30."""
    arch = meta["general.architecture"]
    return gemma_config(
        cfg,
        None,
        hidden_act="gelu_tanh",
        sliding_window=cfg.sliding_window or 4096,
        layer_types=cfg.layer_types or pattern_layer_types(cfg.num_layers, pattern),
        query_pre_attn_scalar=llama_cpp_query_scalar(cfg, layers_27b),
        attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping", 50.0),
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping", 30.0),
    )


SPEC = FamilySpec(
    name="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    hf_model_types=("gemma2",),
    gguf_architectures=("gemma2",),
    sandwich_norms=True,
    finish_hf_config=finish_hf_config,
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(hf=hf_table(SANDWICH_NORMS_HF), gguf=GGUF_NAMES, from_gguf_tensor=from_gguf_tensor),
)
