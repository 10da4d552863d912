"""The decoder-only transformer every family shares: GQA attention with RoPE over the paged KV cache,
a gated MLP, RMSNorm, stacked layers under `lax.scan`.

Families differ by data, not code: which checkpoint tensors a layer has (the weight table: biases,
q/k norms, sandwich norms around attention and MLP) and `ModelConfig` fields (activation, norm offset,
embedding scale, sliding-window layers, soft-caps, query scale, local RoPE base). The forward pass
applies a piece when its weights are in the tree (`"q_norm" in lp`: static pytree structure), so one
traced function serves Llama, Mistral, Qwen2 and Gemma 1/2/3.

Parameters are a pytree; per-layer weights are stacked on a leading layer axis so the layers run under
`lax.scan` and compile once whatever the depth. Weights keep the checkpoint layout `[out, in]`. Layer
keys name roles: `post_attn_norm` is always the norm in front of the MLP (HF Llama's
`post_attention_layernorm`, Gemma 2's `pre_feedforward_layernorm`); `attn_out_norm` / `ffn_out_norm`
normalize the attention / MLP output before the residual add (Gemma 2/3).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig, RopeScaling
from jaxrs.models.layers import (
    AttentionMetadata,
    KVCache,
    activation,
    apply_rope,
    dense,
    embed,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxrs.ops import Kernels
from jaxrs.quant import QuantizedTensor
from jaxrs.quant import stack as stack_quantized

# Stacked layer parameter -> HF checkpoint name under `model.layers.{i}.` (the Llama layer).
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
QKV_BIASES = {f"{p}_bias": f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")}  # Qwen2
QK_NORMS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}  # Gemma 3
SANDWICH_NORMS = {  # Gemma 2/3: norms on both sides of attention and MLP
    "attn_out_norm": "post_attention_layernorm.weight",
    "post_attn_norm": "pre_feedforward_layernorm.weight",
    "ffn_out_norm": "post_feedforward_layernorm.weight",
}

# llama.cpp tensor names -> HF names ("{i}" is the layer index), the Llama layout.
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


def layer_weights(cfg: ModelConfig, *extra: dict[str, str]) -> dict[str, str]:
    """The Llama layer table plus the config's optional biases, then each `extra` table (later wins)."""
    table = dict(LAYER_WEIGHTS)
    if cfg.attention_bias:
        table.update(ATTENTION_BIASES)
    if cfg.mlp_bias:
        table.update(MLP_BIASES)
    for more in extra:
        table.update(more)
    return table


def hf_weight_names(cfg: ModelConfig, per_layer: dict[str, str]) -> list[str]:
    """Every checkpoint tensor a model with this layer table needs."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    names += [f"model.layers.{i}.{s}" for i in range(cfg.num_layers) for s in per_layer.values()]
    return names


def params_from_hf(
    get: Callable[[str], np.ndarray | QuantizedTensor],
    cfg: ModelConfig,
    dtype: jnp.dtype,
    per_layer: dict[str, str],
) -> dict:
    """Build the parameter pytree from a getter of HF-named tensors, stacking layers.

    The getter returns NumPy arrays (cast to `dtype`) or packed `QuantizedTensor`s (kept packed).
    """

    def put(x: np.ndarray | QuantizedTensor) -> jax.Array | QuantizedTensor:
        return jax.device_put(x) if isinstance(x, QuantizedTensor) else jnp.asarray(x, dtype=dtype)

    def stacked(tensors: list) -> np.ndarray | QuantizedTensor:
        if any(isinstance(t, QuantizedTensor) for t in tensors):
            if not all(isinstance(t, QuantizedTensor) for t in tensors):
                raise ValueError("a stacked parameter mixes packed and float layers")
            return stack_quantized(tensors)
        return np.stack(tensors)

    layers = {
        key: put(stacked([get(f"model.layers.{i}.{suffix}") for i in range(cfg.num_layers)]))
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


def _attention(
    cfg: ModelConfig,
    kernels: Kernels,
    meta: AttentionMetadata,
    q: jax.Array,
    kv: KVCache,
    layer: jax.Array,
    sliding: jax.Array,
) -> jax.Array:
    """Paged attention; the window is a static kernel option, so a model mixing sliding and global
    layers picks one of two calls per layer with `lax.cond` on the layer's (traced) kind."""

    def call(window: int | None) -> Callable[[], jax.Array]:
        return lambda: kernels.get("paged_attention")(
            q,
            kv.k,
            kv.v,
            layer,
            meta.block_tables,
            meta.positions,
            meta.context_lens,
            scale=cfg.attention_scale,
            sliding_window=window,
            soft_cap=cfg.attn_logit_softcap,
        )

    kinds = set(cfg.sliding_layers)
    if len(kinds) == 2:
        return jax.lax.cond(sliding, call(cfg.sliding_window), call(None))
    return call(cfg.sliding_window if True in kinds else None)()


def _layer(
    cfg: ModelConfig,
    kernels: Kernels,
    meta: AttentionMetadata,
    rope: tuple[jax.Array, jax.Array],
    h: jax.Array,
    lp: dict,
    kv: KVCache,
    layer: jax.Array,
    sliding: jax.Array,
) -> tuple[jax.Array, KVCache]:
    batch, q_len, _ = h.shape
    eps, offset = cfg.rms_norm_eps, cfg.norm_offset

    def norm(x: jax.Array, key: str) -> jax.Array:
        return rms_norm(x, lp[key], eps, offset=offset) if key in lp else x

    x = norm(h, "input_norm")
    q = dense(x, lp["q_proj"], lp.get("q_proj_bias"), kernels).reshape(
        batch, q_len, cfg.num_heads, cfg.head_dim
    )
    k = dense(x, lp["k_proj"], lp.get("k_proj_bias"), kernels).reshape(
        batch, q_len, cfg.num_kv_heads, cfg.head_dim
    )
    v = dense(x, lp["v_proj"], lp.get("v_proj_bias"), kernels).reshape(
        batch, q_len, cfg.num_kv_heads, cfg.head_dim
    )
    q, k = norm(q, "q_norm"), norm(k, "k_norm")
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    kv = KVCache(*kernels.get("write_kv")(kv.k, kv.v, layer, k, v, meta.slot_mapping))
    attn = _attention(cfg, kernels, meta, q, kv, layer, sliding)
    attn = dense(attn.reshape(batch, q_len, cfg.q_size), lp["o_proj"], lp.get("o_proj_bias"), kernels)
    h = h + norm(attn, "attn_out_norm")
    x = norm(h, "post_attn_norm")
    gate = dense(x, lp["gate_proj"], lp.get("gate_proj_bias"), kernels)
    up = dense(x, lp["up_proj"], lp.get("up_proj_bias"), kernels)
    mlp = dense(activation(gate, cfg.hidden_act) * up, lp["down_proj"], lp.get("down_proj_bias"), kernels)
    return h + norm(mlp, "ffn_out_norm"), kv


def forward(
    params: dict,
    cfg: ModelConfig,
    kernels: Kernels,
    tokens: jax.Array,
    meta: AttentionMetadata,
    kv: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Hidden states `[B, T, hidden]` after the final norm, and the KV cache with this step written."""
    h = embed(params["embed"], tokens, params["final_norm"].dtype)
    if cfg.embedding_scale is not None:
        h = h * jnp.asarray(cfg.embedding_scale, h.dtype)
    rope = rope_cos_sin(meta.positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    rope_local = rope
    if cfg.rope_local_theta is not None:
        local_freq = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, RopeScaling())
        rope_local = rope_cos_sin(meta.positions, local_freq)
    sliding_layers = cfg.sliding_layers

    def body(carry: tuple[jax.Array, KVCache], xs: tuple) -> tuple[tuple[jax.Array, KVCache], None]:
        (h, kv), (lp, layer, sliding) = carry, xs
        if rope_local is rope or not any(sliding_layers):
            layer_rope = rope
        elif all(sliding_layers):
            layer_rope = rope_local
        else:  # mixed layers, each kind with its own RoPE base: pick per (traced) layer kind
            layer_rope = tuple(
                jnp.where(sliding, loc, glob) for loc, glob in zip(rope_local, rope, strict=True)
            )
        return _layer(cfg, kernels, meta, layer_rope, h, lp, kv, layer, sliding), None

    # The cache rides in the carry (not xs/ys) so the donated buffer is updated in place.
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (params["layers"], layers, jnp.asarray(sliding_layers, dtype=bool))
    (h, kv), _ = jax.lax.scan(body, (h, kv), xs)
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps, offset=cfg.norm_offset), kv


def compute_logits(
    params: dict, cfg: ModelConfig, hidden: jax.Array, kernels: Kernels = Kernels()
) -> jax.Array:
    """Logits in f32 (tied embeddings reuse the embedding matrix), soft-capped if the model says so."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if isinstance(head, QuantizedTensor):
        logits = kernels.get("qmatmul")(hidden, head).astype(jnp.float32)
    else:
        logits = jnp.einsum(
            "...h,vh->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
        )
    if cfg.final_logit_softcap is not None:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits
