"""Phi-3 / 3.5 / Phi-4-mini (`Phi3ForCausalLM`): the Llama layer with q/k/v fused in one `qkv_proj`
and gate/up in one `gate_up_proj` (split into the shared decoder's projections at load, so HF folders
and GGUF files give one parameter tree), LongRoPE (`longrope` / `su` scaling: short and long factor
sets and an attention factor), optional partial rotary and sliding window.

llama.cpp's `phi3` files keep the same fused tensors (`attn_qkv`, `ffn_up` holding gate then up) and the
LongRoPE factors as the tensors `rope_factors_long` / `rope_factors_short` (read into the config). No q/k
permutation (NeoX-style RoPE).
"""

from __future__ import annotations

from jaxrs.config import ModelConfig
from jaxrs.loading.names import LLAMA_GGUF, LLAMA_HF, CheckpointNames, HfTable, Rows
from jaxrs.models.spec import FamilySpec

_GGUF_NAMES = {
    k: v
    for k, v in LLAMA_GGUF.items()
    if not k.startswith(("blk.{i}.attn_q.", "blk.{i}.attn_k.", "blk.{i}.attn_v.", "blk.{i}.ffn_"))
} | {
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_names(cfg: ModelConfig) -> HfTable:
    """The Llama layer with q/k/v and gate/up as row ranges of the fused checkpoint tensors."""
    q, kv, ff = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv, gate_up = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
    return LLAMA_HF | {
        "layers.attn.q_proj.weight": Rows(qkv, 0, q),
        "layers.attn.k_proj.weight": Rows(qkv, q, q + kv),
        "layers.attn.v_proj.weight": Rows(qkv, q + kv, q + 2 * kv),
        "layers.mlp.gate_proj.weight": Rows(gate_up, 0, ff),
        "layers.mlp.up_proj.weight": Rows(gate_up, ff, 2 * ff),
    }


SPEC = FamilySpec(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    gguf_architectures=("phi3",),
    partial_rotary=True,
    names=CheckpointNames(hf=hf_names, gguf=_GGUF_NAMES),
)
