"""The decoder-only transformer every family shares: GQA attention with RoPE over the paged KV cache,
a gated, plain or sparse-MoE MLP, RMSNorm or LayerNorm, stacked layers under `lax.scan`.

Families differ by data, not code: which checkpoint tensors a layer has (the weight table: biases,
q/k norms, sandwich norms around attention and MLP, norm biases, a gate projection or not, a router
and experts) and `ModelConfig` fields (activation, norm kind and offset, embedding scale,
sliding-window layers, soft-caps, query scale, local RoPE base, partial rotary, LongRoPE, parallel
attention + MLP, experts per token). The forward pass applies a piece when its weights are in the
tree (`"q_norm" in lp`: static pytree structure), so one traced function serves Llama, Mistral,
Mixtral, Qwen2, Gemma 1/2/3, Phi-2, Phi-3 and Starcoder2.

A weight table maps a parameter key to a checkpoint name, or to a `Rows` range of a fused checkpoint
tensor (Phi-3's `qkv_proj` / `gate_up_proj`, split at load so the tree is the same as for separate
tensors), or to `Experts` (one checkpoint tensor per expert, stacked to `[E, out, in]`).

Parameters are a pytree; per-layer weights are stacked on a leading layer axis so the layers run under
`lax.scan` and compile once whatever the depth, or, split by `unstack_layers` into a tuple of per-layer
trees, run unrolled (see `EngineConfig.layer_loop`). Weights keep the checkpoint layout `[out, in]`.
Layer keys name roles: `post_attn_norm` is always the norm in front of the MLP (HF Llama's
`post_attention_layernorm`, Gemma 2's `pre_feedforward_layernorm`); `attn_out_norm` / `ffn_out_norm`
normalize the attention / MLP output before the residual add (Gemma 2/3); `<norm>_bias` is a LayerNorm's
bias; `router` and `experts_gate` / `experts_up` / `experts_down` (`[L, E, out, in]`) make the MLP a
sparse MoE; without `gate_proj` the MLP is plain (`down(act(up(x)))`).
"""

from __future__ import annotations

import dataclasses
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
    layer_norm,
    longrope_inv_freq,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxrs.ops import Kernels
from jaxrs.quant import QuantizedTensor, dequantize
from jaxrs.quant import stack as stack_quantized
from jaxrs.quant.transcode import unify_formats
from pallas_kernels.qmatmul import matmul_t


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows `[start, stop)` of the fused checkpoint tensor `name` (a layer suffix)."""

    name: str
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Experts:
    """One checkpoint tensor per expert (`name` has an `{e}`), stacked on a leading expert axis."""

    name: str


Spec = str | Rows | Experts

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

# Top-level parameter -> HF checkpoint name (the Llama model). Families may add "final_norm_bias" and
# "lm_head_bias"; "lm_head" is dropped when the embeddings are tied.
TOP_WEIGHTS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
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


def _top_table(cfg: ModelConfig, top: dict[str, str] | None) -> dict[str, str]:
    table = dict(TOP_WEIGHTS if top is None else top)
    if cfg.tie_word_embeddings:
        table.pop("lm_head", None)
    return table


def _spec_names(spec: Spec, cfg: ModelConfig) -> list[str]:
    """The layer-relative checkpoint names a table entry reads."""
    if isinstance(spec, Rows):
        return [spec.name]
    if isinstance(spec, Experts):
        return [spec.name.format(e=e) for e in range(cfg.num_experts)]
    return [spec]


def hf_weight_names(
    cfg: ModelConfig, per_layer: dict[str, Spec], top: dict[str, str] | None = None
) -> list[str]:
    """Every checkpoint tensor a model with this layer table needs (a fused tensor once)."""
    names = list(_top_table(cfg, top).values())
    suffixes = list(dict.fromkeys(n for spec in per_layer.values() for n in _spec_names(spec, cfg)))
    names += [f"model.layers.{i}.{s}" for i in range(cfg.num_layers) for s in suffixes]
    return names


def take(x: np.ndarray | QuantizedTensor, index: int | slice) -> np.ndarray | QuantizedTensor:
    """Part of a checkpoint tensor: an int picks along the leading axis (an expert of a 3-D expert
    tensor), a slice picks rows (`out`) of a fused matrix or bias. Packed tensors stay packed (every
    format quantizes rows independently, so a row range of one is the same format over those rows)."""
    if isinstance(index, int):
        return x[index]
    if isinstance(x, QuantizedTensor):
        arrays = {n: a[..., index, :] for n, a in x.arrays.items()}
        rows = len(range(*index.indices(x.out_in[0])))
        return QuantizedTensor(x.fmt, (rows, x.out_in[1]), arrays)
    return x[..., index, :] if x.ndim >= 2 else x[index]


def stack(tensors: list, name: str = "") -> np.ndarray | QuantizedTensor:
    """Stack per-layer (or per-expert) tensors on a new leading axis, packed ones staying packed (in
    one format: see `unify_formats`)."""
    if any(isinstance(t, QuantizedTensor) for t in tensors):
        if not all(isinstance(t, QuantizedTensor) for t in tensors):
            raise ValueError("a stacked parameter mixes packed and float tensors")
        return stack_quantized(unify_formats(tensors, name))
    return np.stack(tensors)


def params_from_hf(
    get: Callable[[str], np.ndarray | QuantizedTensor],
    cfg: ModelConfig,
    dtype: jnp.dtype,
    per_layer: dict[str, Spec],
    top: dict[str, str] | None = None,
) -> dict:
    """Build the parameter pytree from a getter of HF-named tensors, stacking layers (and experts).

    The getter returns NumPy arrays (cast to `dtype`) or packed `QuantizedTensor`s (kept packed). A fused
    tensor that `Rows` entries split is read once and kept until its last part has been taken.
    """

    def put(x: np.ndarray | QuantizedTensor) -> jax.Array | QuantizedTensor:
        return jax.device_put(x) if isinstance(x, QuantizedTensor) else jnp.asarray(x, dtype=dtype)

    parts_left = {}  # fused suffix -> Rows entries reading it (per layer)
    for spec in per_layer.values():
        if isinstance(spec, Rows):
            parts_left[spec.name] = parts_left.get(spec.name, 0) + 1
    fused: dict[str, list] = {}  # full name -> [tensor, parts still to take]

    def read(i: int, spec: Spec) -> np.ndarray | QuantizedTensor:
        prefix = f"model.layers.{i}."
        if isinstance(spec, Experts):
            return stack([get(prefix + spec.name.format(e=e)) for e in range(cfg.num_experts)], spec.name)
        if not isinstance(spec, Rows):
            return get(prefix + spec)
        name = prefix + spec.name
        entry = fused.setdefault(name, [None, parts_left[spec.name]])
        if entry[0] is None:
            entry[0] = get(name)
        part, entry[1] = take(entry[0], slice(spec.start, spec.stop)), entry[1] - 1
        if entry[1] == 0:
            del fused[name]
        return part

    layers = {
        key: put(stack([read(i, spec) for i in range(cfg.num_layers)], key))
        for key, spec in per_layer.items()
    }
    params = {key: put(get(name)) for key, name in _top_table(cfg, top).items()}
    params["layers"] = layers
    return params


def _attention(
    cfg: ModelConfig,
    kernels: Kernels,
    meta: AttentionMetadata,
    q: jax.Array,
    kv: KVCache,
    layer: jax.Array | int,
    sliding: jax.Array | bool,
) -> jax.Array:
    """Paged attention; the window is a static kernel option, so a model mixing sliding and global
    layers picks one of two calls per layer: with `lax.cond` on a scanned layer's (traced) kind, in
    Python for an unrolled layer's."""

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
    if isinstance(sliding, bool):  # an unrolled layer: its kind is known when tracing
        return call(cfg.sliding_window if sliding else None)()
    if len(kinds) == 2:
        return jax.lax.cond(sliding, call(cfg.sliding_window), call(None))
    return call(cfg.sliding_window if True in kinds else None)()


def _norm(cfg: ModelConfig, x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    """The model's norm: LayerNorm (with its bias) or RMSNorm (with the family's weight offset)."""
    if cfg.layer_norm:
        return layer_norm(x, weight, bias, cfg.rms_norm_eps)
    return rms_norm(x, weight, cfg.rms_norm_eps, offset=cfg.norm_offset)


def _ragged(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul: rows of `x` `[M, in]` sorted by group, group g times `w[g]` (`[G, out, in]`)."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    return jax.lax.ragged_dot_general(x, w, group_sizes, dims)


def _moe(cfg: ModelConfig, x: jax.Array, lp: dict) -> jax.Array:
    """Sparse MoE MLP (Mixtral): each token goes to its top-k experts by router logit, weighted by the
    softmax over those k logits (transformers' softmax-then-renormalize, the same numbers). Token copies
    are sorted by expert and run as grouped matmuls (`ragged_dot`), so no Python loop over experts;
    packed experts are dequantized first (one layer's worth at a time)."""
    shape, k, n_exp = x.shape, cfg.num_experts_per_tok, cfg.num_experts
    xf = x.reshape(-1, shape[-1])

    def weight(key: str) -> jax.Array:
        w = lp[key]
        return dequantize(w, xf.dtype) if isinstance(w, QuantizedTensor) else w.astype(xf.dtype)

    logits = jnp.einsum("th,eh->te", xf, weight("router"), preferred_element_type=jnp.float32)
    top_logits, top_experts = jax.lax.top_k(logits, k)  # [T, k]; softmax is monotonic
    weights = jax.nn.softmax(top_logits, axis=-1)
    flat = top_experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k  # which token each sorted copy comes from
    group_sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)

    xs = xf[token]
    gate = _ragged(xs, weight("experts_gate"), group_sizes)
    up = _ragged(xs, weight("experts_up"), group_sizes)
    out = _ragged(activation(gate, cfg.hidden_act) * up, weight("experts_down"), group_sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(xf).at[token].add(out).reshape(shape)


def _mlp(cfg: ModelConfig, kernels: Kernels, x: jax.Array, lp: dict) -> jax.Array:
    """Gated (`gate_proj` present: act(gate) * up), plain (act(up): Phi-2, Starcoder2) or MoE MLP."""
    if "router" in lp:
        return _moe(cfg, x, lp)
    up = dense(x, lp["up_proj"], lp.get("up_proj_bias"), kernels)
    if "gate_proj" in lp:
        gate = dense(x, lp["gate_proj"], lp.get("gate_proj_bias"), kernels)
        hidden = activation(gate, cfg.hidden_act) * up
    else:
        hidden = activation(up, cfg.hidden_act)
    return dense(hidden, lp["down_proj"], lp.get("down_proj_bias"), kernels)


def _layer(
    cfg: ModelConfig,
    kernels: Kernels,
    meta: AttentionMetadata,
    rope: tuple[jax.Array, jax.Array],
    h: jax.Array,
    lp: dict,
    kv: KVCache,
    layer: jax.Array | int,
    sliding: jax.Array | bool,
) -> tuple[jax.Array, KVCache]:
    batch, q_len, _ = h.shape

    def norm(x: jax.Array, key: str) -> jax.Array:
        return _norm(cfg, x, lp[key], lp.get(f"{key}_bias")) if key in lp else x

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
    if cfg.parallel_block:  # Phi-2: x + attn(norm(x)) + mlp(norm(x))
        return h + attn + _mlp(cfg, kernels, x, lp), kv
    h = h + norm(attn, "attn_out_norm")
    x = norm(h, "post_attn_norm")
    return h + norm(_mlp(cfg, kernels, x, lp), "ffn_out_norm"), kv


def _rope(
    cfg: ModelConfig, theta: float, scaling: RopeScaling, meta: AttentionMetadata
) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, T, rotary_dim]` for this step's positions.

    LongRoPE does what transformers does: a sequence uses the long factors once its length passes
    `original_max_position_embeddings`, the short ones before, chosen per sequence for the whole step.
    The length is `rope_lens` when given (every chunk of a prefill uses the whole prefill's length, so
    chunking does not change the result), else `context_lens`. Keys already in the cache keep the
    rotation they were written with; cos and sin are scaled by the attention factor either way.
    """
    dim = cfg.rotary_dim or cfg.head_dim
    if scaling.kind != "longrope":
        return rope_cos_sin(meta.positions, rope_inv_freq(cfg.head_dim, theta, scaling, dim))
    short = rope_cos_sin(meta.positions, longrope_inv_freq(dim, theta, scaling.short_factor))
    long = rope_cos_sin(meta.positions, longrope_inv_freq(dim, theta, scaling.long_factor))
    length = meta.context_lens if meta.rope_lens is None else meta.rope_lens
    use_long = (jnp.asarray(length) > scaling.original_max_position_embeddings)[:, None, None]
    factor = jnp.float32(scaling.attention_factor)
    return tuple(jnp.where(use_long, lg, sh) * factor for sh, lg in zip(short, long, strict=True))


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
    rope = _rope(cfg, cfg.rope_theta, cfg.rope_scaling, meta)
    rope_local = rope
    if cfg.rope_local_theta is not None:
        rope_local = _rope(cfg, cfg.rope_local_theta, RopeScaling(), meta)
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

    if isinstance(params["layers"], tuple):  # split per layer (`unstack_layers`): unrolled
        for i, lp in enumerate(params["layers"]):
            sliding = bool(sliding_layers[i])
            h, kv = _layer(cfg, kernels, meta, rope_local if sliding else rope, h, lp, kv, i, sliding)
    else:  # the cache rides in the carry (not xs/ys) so the donated buffer is updated in place
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        xs = (params["layers"], layers, jnp.asarray(sliding_layers, dtype=bool))
        (h, kv), _ = jax.lax.scan(body, (h, kv), xs)
    return _norm(cfg, h, params["final_norm"], params.get("final_norm_bias")), kv


def unstack_layers(params: dict) -> None:
    """Split `params["layers"]` into a tuple of per-layer trees, each leaf its own buffer, so `forward`
    runs the layers unrolled and a dot reads its weight where it lies: XLA:CPU copies a `lax.scan`
    layer's slice out of the stack before YNNPACK's dot reads it. In place: each stacked leaf leaves the
    tree as soon as it is split, so memory grows by one stacked leaf at most."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return
    split = tuple({} for _ in range(jax.tree.leaves(stacked)[0].shape[0]))
    for key in list(stacked):
        leaf = stacked.pop(key)
        for i, lp in enumerate(split):
            lp[key] = jax.tree.map(lambda a, i=i: a[i], leaf)
    params["layers"] = split


def stack_layers(params: dict) -> None:
    """`unstack_layers` undone, in place: one stacked tree, whose layers `forward` runs under `lax.scan`."""
    split = params["layers"]
    if not isinstance(split, tuple):
        return
    stacked: dict = {}
    params["layers"] = stacked
    for key in list(split[0]):
        stacked[key] = jax.tree.map(lambda *xs: jnp.stack(xs), *(lp.pop(key) for lp in split))


def compute_logits(
    params: dict, cfg: ModelConfig, hidden: jax.Array, kernels: Kernels = Kernels()
) -> jax.Array:
    """Logits in f32 (tied embeddings reuse the embedding matrix), soft-capped if the model says so."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if isinstance(head, QuantizedTensor):
        logits = kernels.get("qmatmul")(hidden, head).astype(jnp.float32)
    else:
        logits = matmul_t(hidden, head, jnp.float32)
    if "lm_head_bias" in params:
        logits = logits + params["lm_head_bias"].astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits
