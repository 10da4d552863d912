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
from jaxrs.loading.names import CheckpointNames, GgufSplit, hf_table
from jaxrs.models.spec import FamilySpec

_LAYER = "model.layers.{i}."
_HF_NAMES = {
    "final_norm.weight": "model.final_layernorm.weight",
    "final_norm.bias": "model.final_layernorm.bias",
    "layers.attn.o_proj.weight": "self_attn.dense.weight",
    "layers.attn.o_proj.bias": "self_attn.dense.bias",
    **{f"layers.mlp.up_proj.{kind}": f"mlp.fc1.{kind}" for kind in ("weight", "bias")},
    **{f"layers.mlp.down_proj.{kind}": f"mlp.fc2.{kind}" for kind in ("weight", "bias")},
}
_GGUF_NAMES = {
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


def gguf_split(cfg: ModelConfig) -> GgufSplit:
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


SPEC = FamilySpec(
    name="phi",
    hf_architectures=("PhiForCausalLM",),
    hf_model_types=("phi",),
    gguf_architectures=("phi2",),
    gated_mlp=False,
    head_bias=True,
    partial_rotary=True,
    finish_hf_config=finish_hf_config,
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(hf=hf_table(_HF_NAMES), gguf=_GGUF_NAMES, gguf_split=gguf_split),
)
