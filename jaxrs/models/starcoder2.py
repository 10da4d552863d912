"""Starcoder2 (`Starcoder2ForCausalLM`): GQA attention with biases, LayerNorm with bias, a plain
(non-gated) tanh-GELU MLP `c_proj(gelu(c_fc(x)))` with biases, optional sliding window, tied or untied
embeddings.

llama.cpp's `starcoder2` files: the Llama names plus biases, no q/k permutation (NeoX-style RoPE) and
no sliding window (its graph has none, so a GGUF runs with full attention).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.models import decoder

HF_ARCHITECTURES = ("Starcoder2ForCausalLM",)
HF_MODEL_TYPES = ("starcoder2",)
GGUF_ARCHITECTURES = ("starcoder2",)
GGUF_ROPE_PERMUTED: dict[str, str] = {}

TOP_WEIGHTS = decoder.TOP_WEIGHTS | {"final_norm_bias": "model.norm.bias"}
NORM_BIASES = {
    "input_norm_bias": "input_layernorm.bias",
    "post_attn_norm_bias": "post_attention_layernorm.bias",
}
GGUF_NAMES = {k: v for k, v in decoder.GGUF_NAMES.items() if ".ffn_" not in k} | {
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


def layer_weights(cfg: ModelConfig) -> dict[str, str]:
    """The Llama layer (attention biases with `use_bias`) with LayerNorm biases and the plain MLP."""
    table = {
        key: name
        for key, name in decoder.layer_weights(cfg).items()
        if not key.startswith(("gate_proj", "up_proj", "down_proj"))
    }
    table |= NORM_BIASES | {"up_proj": "mlp.c_fc.weight", "down_proj": "mlp.c_proj.weight"}
    if cfg.mlp_bias:
        table |= {"up_proj_bias": "mlp.c_fc.bias", "down_proj_bias": "mlp.c_proj.bias"}
    return table


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    bias = bool(raw.get("use_bias", True))
    eps = float(raw.get("norm_epsilon", 1e-5))
    return dataclasses.replace(cfg, layer_norm=True, rms_norm_eps=eps, attention_bias=bias, mlp_bias=bias)


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    return dataclasses.replace(
        cfg, layer_norm=True, hidden_act="gelu_tanh", attention_bias=True, mlp_bias=True
    )
