"""Starcoder2 (`Starcoder2ForCausalLM`): GQA attention with biases, LayerNorm with bias, a plain
(non-gated) tanh-GELU MLP `c_proj(gelu(c_fc(x)))` with biases, optional sliding window, tied or untied
embeddings.

llama.cpp's `starcoder2` files: the Llama names plus biases, no q/k permutation (NeoX-style RoPE) and
no sliding window (its graph has none, so a GGUF runs with full attention).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.loading.names import LLAMA_GGUF, CheckpointNames, hf_table
from jaxrs.models.spec import FamilySpec

_HF_NAMES = {
    **{f"layers.mlp.up_proj.{kind}": f"mlp.c_fc.{kind}" for kind in ("weight", "bias")},
    **{f"layers.mlp.down_proj.{kind}": f"mlp.c_proj.{kind}" for kind in ("weight", "bias")},
}
_GGUF_NAMES = {k: v for k, v in LLAMA_GGUF.items() if ".ffn_" not in k} | {
    "output_norm.bias": "model.norm.bias",
    **{
        f"blk.{{i}}.{g}.{kind}": f"model.layers.{{i}}.{h}.{kind}"
        for g, h in {
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj",
        }.items()
        for kind in ("weight", "bias")
    },
}


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    """transformers' Starcoder2 defaults: biases, eps 1e-5, tied embeddings (a config.json written by
    transformers 4 leaves `tie_word_embeddings` out when it is true)."""
    bias = bool(raw.get("use_bias", True))
    eps = float(raw.get("norm_epsilon", 1e-5))
    tied = bool(raw.get("tie_word_embeddings", True))
    return dataclasses.replace(
        cfg, layer_norm=True, rms_norm_eps=eps, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied
    )


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    return dataclasses.replace(
        cfg, layer_norm=True, hidden_act="gelu_tanh", attention_bias=True, mlp_bias=True
    )


SPEC = FamilySpec(
    name="starcoder2",
    hf_architectures=("Starcoder2ForCausalLM",),
    hf_model_types=("starcoder2",),
    gguf_architectures=("starcoder2",),
    gated_mlp=False,
    finish_hf_config=finish_hf_config,
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(hf=hf_table(_HF_NAMES), gguf=_GGUF_NAMES),
)
