"""Llama family (Llama 2/3/3.1, SmolLM, Mistral without sliding window): GQA, RoPE, SwiGLU, RMSNorm.

Parameters are a pytree; per-layer weights are stacked on a leading layer axis so the layers run under
`lax.scan` and compile once whatever the depth. Weights keep the checkpoint layout `[out, in]`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.models.layers import (
    AttentionMetadata,
    KVCache,
    apply_rope,
    dense,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxrs.ops import Kernels

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPES = ("llama", "mistral")  # config.json `model_type`, when `architectures` is absent
GGUF_ARCHITECTURES = ("llama",)

# Stacked layer parameter -> HF checkpoint name under `model.layers.{i}.`
LAYER_WEIGHTS = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
ATTENTION_BIASES = {f"{p}_bias": f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
MLP_BIASES = {f"{p}_bias": f"mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")}

# llama.cpp tensor names -> HF names ("{i}" is the layer index).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# llama.cpp permutes q/k rows for its interleaved RoPE; the loader undoes it (value: heads to use).
GGUF_ROPE_PERMUTED = {"blk.{i}.attn_q.weight": "num_heads", "blk.{i}.attn_k.weight": "num_kv_heads"}


def hf_weight_names(cfg: ModelConfig) -> list[str]:
    """Every checkpoint tensor this config needs."""
    per_layer = dict(LAYER_WEIGHTS)
    if cfg.attention_bias:
        per_layer.update(ATTENTION_BIASES)
    if cfg.mlp_bias:
        per_layer.update(MLP_BIASES)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    names += [f"model.layers.{i}.{s}" for i in range(cfg.num_layers) for s in per_layer.values()]
    return names


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, dtype: jnp.dtype) -> dict:
    """Build the parameter pytree from a getter of HF-named tensors (numpy), stacking layers."""
    per_layer = dict(LAYER_WEIGHTS)
    if cfg.attention_bias:
        per_layer.update(ATTENTION_BIASES)
    if cfg.mlp_bias:
        per_layer.update(MLP_BIASES)

    def put(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, dtype=dtype)

    layers = {
        key: put(np.stack([get(f"model.layers.{i}.{suffix}") for i in range(cfg.num_layers)]))
        for key, suffix in per_layer.items()
    }
    params = {
        "embed": put(get("model.embed_tokens.weight")),
        "layers": layers,
        "final_norm": put(get("model.norm.weight")),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = put(get("lm_head.weight"))
    return params


def _layer(
    cfg: ModelConfig,
    kernels: Kernels,
    meta: AttentionMetadata,
    cos: jax.Array,
    sin: jax.Array,
    h: jax.Array,
    lp: dict,
    kv: KVCache,
    layer: jax.Array,
) -> tuple[jax.Array, KVCache]:
    batch, q_len, _ = h.shape
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q = dense(x, lp["q_proj"], lp.get("q_proj_bias")).reshape(batch, q_len, cfg.num_heads, cfg.head_dim)
    k = dense(x, lp["k_proj"], lp.get("k_proj_bias")).reshape(batch, q_len, cfg.num_kv_heads, cfg.head_dim)
    v = dense(x, lp["v_proj"], lp.get("v_proj_bias")).reshape(batch, q_len, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = KVCache(*kernels.get("write_kv")(kv.k, kv.v, layer, k, v, meta.slot_mapping))
    attn = kernels.get("paged_attention")(
        q,
        kv.k,
        kv.v,
        layer,
        meta.block_tables,
        meta.positions,
        meta.context_lens,
        scale=cfg.head_dim**-0.5,
    )
    h = h + dense(attn.reshape(batch, q_len, cfg.q_size), lp["o_proj"], lp.get("o_proj_bias"))
    x = rms_norm(h, lp["post_attn_norm"], cfg.rms_norm_eps)
    gate = dense(x, lp["gate_proj"], lp.get("gate_proj_bias"))
    up = dense(x, lp["up_proj"], lp.get("up_proj_bias"))
    h = h + dense(jax.nn.silu(gate) * up, lp["down_proj"], lp.get("down_proj_bias"))
    return h, kv


def forward(
    params: dict,
    cfg: ModelConfig,
    kernels: Kernels,
    tokens: jax.Array,
    meta: AttentionMetadata,
    kv: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Hidden states `[B, T, hidden]` after the final norm, and the KV cache with this step written."""
    h = params["embed"][tokens]
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_cos_sin(meta.positions, inv_freq)

    def body(carry: tuple[jax.Array, KVCache], xs: tuple) -> tuple[tuple[jax.Array, KVCache], None]:
        (h, kv), (lp, layer) = carry, xs
        return _layer(cfg, kernels, meta, cos, sin, h, lp, kv, layer), None

    # The cache rides in the carry (not xs/ys) so the donated buffer is updated in place.
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (h, kv), _ = jax.lax.scan(body, (h, kv), (params["layers"], layers))
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), kv


def compute_logits(params: dict, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Logits in f32 (tied embeddings reuse the embedding matrix)."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...h,vh->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
