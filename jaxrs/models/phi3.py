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
from jaxrs.models import decoder
from jaxrs.models.decoder import Rows

HF_ARCHITECTURES = ("Phi3ForCausalLM",)
HF_MODEL_TYPES = ("phi3",)
GGUF_ARCHITECTURES = ("phi3",)
GGUF_ROPE_PERMUTED: dict[str, str] = {}
GGUF_NAMES = {
    k: v
    for k, v in decoder.GGUF_NAMES.items()
    if not k.startswith(("blk.{i}.attn_q.", "blk.{i}.attn_k.", "blk.{i}.attn_v.", "blk.{i}.ffn_"))
} | {
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def layer_weights(cfg: ModelConfig) -> dict[str, str | Rows]:
    """The Llama layer with q/k/v and gate/up as row ranges of the fused checkpoint tensors."""
    q, kv, ff = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv, gate_up = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
    return decoder.layer_weights(cfg) | {
        "q_proj": Rows(qkv, 0, q),
        "k_proj": Rows(qkv, q, q + kv),
        "v_proj": Rows(qkv, q + kv, q + 2 * kv),
        "gate_proj": Rows(gate_up, 0, ff),
        "up_proj": Rows(gate_up, ff, 2 * ff),
    }
