"""Phi-1 / 1.5 / 2 (`PhiForCausalLM`): attention and a plain GELU MLP side by side on one LayerNorm
(`x + attn(ln(x)) + mlp(ln(x))`), biases everywhere, partial rotary (`partial_rotary_factor` of each
head), a final LayerNorm and an output head with a bias.

llama.cpp's `phi2` files keep q/k/v either separate or fused in one `attn_qkv` (files converted from
the original `Wqkv` checkpoints); the fused one is split at load, so both give the HF parameter tree.
No q/k permutation (NeoX-style RoPE).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig

HF_ARCHITECTURES = ("PhiForCausalLM",)
HF_MODEL_TYPES = ("phi",)
GGUF_ARCHITECTURES = ("phi2",)
GGUF_ROPE_PERMUTED: dict[str, str] = {}

TOP_WEIGHTS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.final_layernorm.weight",
    "final_norm_bias": "model.final_layernorm.bias",
    "lm_head": "lm_head.weight",
    "lm_head_bias": "lm_head.bias",
}
LAYER_WEIGHTS = {
    "input_norm": "input_layernorm.weight",
    "input_norm_bias": "input_layernorm.bias",
    **{f"{p}_proj": f"self_attn.{p}_proj.weight" for p in "qkv"},
    **{f"{p}_proj_bias": f"self_attn.{p}_proj.bias" for p in "qkv"},
    "o_proj": "self_attn.dense.weight",
    "o_proj_bias": "self_attn.dense.bias",
    "up_proj": "mlp.fc1.weight",
    "up_proj_bias": "mlp.fc1.bias",
    "down_proj": "mlp.fc2.weight",
    "down_proj_bias": "mlp.fc2.bias",
}
_LAYER = "model.layers.{i}."
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.final_layernorm.weight",
    "output_norm.bias": "model.final_layernorm.bias",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
    **{
        f"blk.{{i}}.{gguf_name}.{kind}": f"{_LAYER}{hf_name}.{kind}"
        for gguf_name, hf_name in {
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.dense",
            "ffn_up": "mlp.fc1",
            "ffn_down": "mlp.fc2",
        }.items()
        for kind in ("weight", "bias")
    },
}


def gguf_split(cfg: ModelConfig) -> dict[str, list[tuple[str, int | slice]]]:
    """The fused `attn_qkv` weight and bias: q, k, v stacked by rows."""
    q, kv = cfg.q_size, cfg.kv_size
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    return {
        f"blk.{{i}}.attn_qkv.{kind}": [(f"{_LAYER}self_attn.{p}_proj.{kind}", r) for p, r in rows.items()]
        for kind in ("weight", "bias")
    }


def phi_config(cfg: ModelConfig, **changes) -> ModelConfig:
    """What every Phi-1/2 has: LayerNorm, the parallel block, biases, untied head."""
    return dataclasses.replace(
        cfg, layer_norm=True, parallel_block=True, attention_bias=True, mlp_bias=True, **changes
    )


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    if raw.get("qk_layernorm"):
        raise ValueError("Phi with qk_layernorm is not supported")
    return phi_config(cfg, rms_norm_eps=float(raw.get("layer_norm_eps", 1e-5)))


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    """llama.cpp's phi2 graph: tanh GELU (HF's `gelu_new`)."""
    return phi_config(cfg, hidden_act="gelu_tanh")


def layer_weights(cfg: ModelConfig) -> dict:
    return LAYER_WEIGHTS
