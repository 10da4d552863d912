"""The decoder-only transformer every family shares, as `flax.nnx` modules: GQA attention with RoPE over
the paged KV cache, a gated, plain or sparse-MoE MLP, RMSNorm or LayerNorm, layers stacked under
`lax.scan` or unrolled.

Families differ by data, not code: the `ModelConfig` (activation, norm kind and offset, biases,
embedding scale, sliding-window layers, soft-caps, query scale, local RoPE base, partial rotary,
LongRoPE, parallel attention + MLP, experts) and a few structural flags of the family's `FamilySpec`
(q/k norms, sandwich norms, a gated MLP, a head bias). Optional pieces are module attributes that are
`None` when absent, decided when the module is built, never from which tensors a checkpoint holds.

The modules are used functionally (the pattern of vLLM's JAX backend): `model_graph(cfg)` builds the
model abstractly and keeps its graph definition; the loader fills the matching state (a nested dict of
arrays and `QuantizedTensor`s: `LoadedModel.params`); the jitted steps take that state as their parameter
pytree and `nnx.merge` it with the graph inside the trace (`merge`). The KV cache is
an argument, never module state, so it can be donated.

Stacked parameters have a leading layer axis and run under `lax.scan`, so compile time does not grow
with depth; `unstack_layers` splits them into a tuple of per-layer trees that run unrolled (see
`EngineConfig.layer_loop`). Parameter paths name roles: `post_attn_norm` is always the norm in front of
the MLP; `attn_out_norm` / `ffn_out_norm` normalize the attention / MLP output before the residual add.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.config import ModelConfig, RopeScaling
from jaxrs.lora.experts import ragged_matmul as _ragged
from jaxrs.models.layers import (
    AttentionMetadata,
    KVCache,
    activation,
    apply_rope,
    dynamic_inv_freq,
    gated_activation,
    longrope_inv_freq,
    rope_cos_sin,
    rope_inv_freq,
)
from jaxrs.models.nn import Embedding, Experts, Linear, Norm, head_logits, make_norm, value
from jaxrs.models.registry import family
from jaxrs.models.spec import FamilySpec
from jaxrs.ops import Kernels, chosen_gemm_dtype
from jaxrs.quant import QuantizedTensor, dequantize, stacked_layer
from pallas_kernels.qmatmul import CPU_GEMV_ROWS, few_row_path

Rope = tuple[jax.Array, jax.Array]


class StepInputs(NamedTuple):
    """What a layer reads besides its hidden states and the cache: the RoPE tables for its kind, where
    the step's tokens sit in the paged cache, and the kernels the ops resolve to."""

    rope: Rope
    meta: AttentionMetadata
    kernels: Kernels


# Where a layer-kind conditional runs o_proj (`Attention._attend_and_project`, sliding and global layers)
# and the products are one-row GEMVs, the layer loop on CPU keeps every packed weight in its stack
# (`stacked_layer.scan_packed_in_place`): a layer's slice handed to a conditional is copied out of its stack
# first (Gemma-3-270M's one-row step: 142 us a layer for o_proj's codes; in place it took 0.84-1.00x the
# time; bench/RESULTS.md, "o_proj's weight left in its stack under the layer-kind conditional"). From 4
# rows the GEMMs or tiles take their own rule. Read when tracing, so a benchmark may set it between compiles.
IN_PLACE_UNDER_COND = True


def mixes_layer_kinds(cfg: ModelConfig) -> bool:
    """Whether the model has sliding and global layers both: a scanned layer then picks its attention (and
    o_proj) under `lax.cond` on its kind."""
    return len(set(cfg.sliding_layers)) == 2


class Attention(nnx.Module):
    """Paged GQA attention: projections, optional q/k norms, RoPE, the cache write, the attention op."""

    def __init__(self, cfg: ModelConfig, spec: FamilySpec):
        qkv_bias = cfg.attention_bias or spec.qkv_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.q_size, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if spec.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if spec.qk_norm else None
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, step: StepInputs, kv: KVCache, layer: jax.Array | int, sliding: jax.Array | bool
    ) -> tuple[jax.Array, KVCache]:
        cfg, (rope, meta, kernels) = self.cfg, step
        batch, q_len, _ = x.shape
        q = self.q_proj(x, kernels).reshape(batch, q_len, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, kernels).reshape(batch, q_len, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, kernels).reshape(batch, q_len, cfg.num_kv_heads, cfg.head_dim)
        q, k = _maybe(self.q_norm, q, kernels), _maybe(self.k_norm, k, kernels)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kv = KVCache(*kernels.get("write_kv")(kv.k, kv.v, layer, k, v, meta.slot_mapping))
        return self._attend_and_project(kernels, meta, q, kv, layer, sliding), kv

    def _attend_and_project(
        self,
        kernels: Kernels,
        meta: AttentionMetadata,
        q: jax.Array,
        kv: KVCache,
        layer: jax.Array | int,
        sliding: jax.Array | bool,
    ) -> jax.Array:
        """Attention, then o_proj. The window is a static kernel option, so a model mixing sliding and
        global layers picks one of two calls per layer: with `lax.cond` on a scanned layer's (traced)
        kind, in Python for an unrolled layer's. o_proj runs inside each branch: on XLA:CPU the one-row
        product reading a conditional's result ran 5-8x slower than the same product inside the branch
        (Gemma-3-270M decode: 751 against ~90 us a layer; bench/RESULTS.md, "o_proj inside the
        layer-kind branch")."""
        cfg = self.cfg
        batch, q_len = q.shape[:2]

        def call(window: int | None) -> Callable[[], jax.Array]:
            def attend_and_project() -> jax.Array:
                out = kernels.get("paged_attention")(
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
                return self.o_proj(out.reshape(batch, q_len, cfg.q_size), kernels)

            return attend_and_project

        if isinstance(sliding, bool):  # an unrolled layer: its kind is known when tracing
            return call(cfg.sliding_window if sliding else None)()
        if mixes_layer_kinds(cfg):
            return jax.lax.cond(sliding, call(cfg.sliding_window), call(None))
        return call(cfg.sliding_window if any(cfg.sliding_layers) else None)()


class MLP(nnx.Module):
    """Gated (`act(gate(x)) * up(x)`) or plain (`act(up(x))`: Phi-2, Starcoder2), then `down`."""

    def __init__(self, cfg: ModelConfig, *, gated: bool):
        bias = cfg.mlp_bias
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias) if gated else None
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        up = self.up_proj(x, kernels)
        if self.gate_proj is None:
            hidden = activation(up, self.act)
        else:
            hidden = gated_activation(self.gate_proj(x, kernels), up, self.act)
        return self.down_proj(hidden, kernels)


class MoE(nnx.Module):
    """Sparse MoE MLP (Mixtral): each token goes to its top-k experts by router logit, weighted by the
    softmax over those k logits (transformers' softmax-then-renormalize, the same numbers). Token copies
    are sorted by expert and run as grouped matmuls (`ragged_dot`), so no Python loop over experts;
    packed experts are dequantized first (one layer's worth at a time)."""

    def __init__(self, cfg: ModelConfig):
        hidden, ffn, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.router = Linear(hidden, n)
        self.gate_proj = Experts(n, hidden, ffn)
        self.up_proj = Experts(n, hidden, ffn)
        self.down_proj = Experts(n, ffn, hidden)
        self.top_k, self.act = cfg.num_experts_per_tok, cfg.hidden_act

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        shape, k = x.shape, self.top_k
        xf = x.reshape(-1, shape[-1])
        router = value(self.router.weight)
        router = (
            dequantize(router, xf.dtype) if isinstance(router, QuantizedTensor) else router.astype(xf.dtype)
        )
        logits = jnp.einsum("th,eh->te", xf, router, preferred_element_type=jnp.float32)
        top_logits, top_experts = jax.lax.top_k(logits, k)  # [T, k]; softmax is monotonic
        weights = jax.nn.softmax(top_logits, axis=-1)
        flat = top_experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k  # which token each sorted copy comes from
        group_sizes = jnp.bincount(flat, length=logits.shape[-1]).astype(jnp.int32)

        xs = xf[token]
        picked = (flat[order], token // shape[-2])  # each copy's expert and batch row (LoRA adapters)
        gate = _ragged(xs, self.gate_proj.dense(xf.dtype), group_sizes) + self.gate_proj.lora(xs, *picked)
        up = _ragged(xs, self.up_proj.dense(xf.dtype), group_sizes) + self.up_proj.lora(xs, *picked)
        hidden = gated_activation(gate, up, self.act)
        out = _ragged(hidden, self.down_proj.dense(xf.dtype), group_sizes)
        out = out + self.down_proj.lora(hidden, *picked)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros_like(xf).at[token].add(out).reshape(shape)


def _maybe(norm: Norm | None, x: jax.Array, kernels: Kernels) -> jax.Array:
    return x if norm is None else norm(x, kernels)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP with residuals; optional sandwich norms (Gemma 2/3) or the parallel
    block of Phi-2 (`x + attn(norm(x)) + mlp(norm(x))`)."""

    def __init__(self, cfg: ModelConfig, spec: FamilySpec):
        hidden = cfg.hidden_size
        self.input_norm = make_norm(cfg, hidden)
        self.attn = Attention(cfg, spec)
        self.attn_out_norm = make_norm(cfg, hidden) if spec.sandwich_norms else None
        self.post_attn_norm = None if cfg.parallel_block else make_norm(cfg, hidden)
        self.mlp = MoE(cfg) if cfg.num_experts else MLP(cfg, gated=spec.gated_mlp)
        self.ffn_out_norm = make_norm(cfg, hidden) if spec.sandwich_norms else None

    def __call__(
        self, h: jax.Array, step: StepInputs, kv: KVCache, layer: jax.Array | int, sliding: jax.Array | bool
    ) -> tuple[jax.Array, KVCache]:
        kernels = step.kernels
        x = self.input_norm(h, kernels)
        attn, kv = self.attn(x, step, kv, layer, sliding)
        if self.post_attn_norm is None:  # the parallel block
            return h + attn + self.mlp(x, kernels), kv
        h = h + _maybe(self.attn_out_norm, attn, kernels)
        x = self.post_attn_norm(h, kernels)
        return h + _maybe(self.ffn_out_norm, self.mlp(x, kernels), kernels), kv


def _rope(cfg: ModelConfig, theta: float, scaling: RopeScaling, meta: AttentionMetadata) -> Rope:
    """cos/sin `[B, T, rotary_dim]` for this step's positions.

    LongRoPE does what transformers does: a sequence uses the long factors once its length passes
    `original_max_position_embeddings`, the short ones before, chosen per sequence for the whole step
    (dynamic NTK its base, in the same way; YaRN's frequencies are fixed, its cos/sin scaled).
    The length is `rope_lens` when given (every chunk of a prefill uses the whole prefill's length, so
    chunking does not change the result), else `context_lens`. Keys already in the cache keep the
    rotation they were written with; cos and sin are scaled by the attention factor either way.
    """
    dim = cfg.rotary_dim or cfg.head_dim
    factor = jnp.float32(scaling.attention_factor)
    length = meta.context_lens if meta.rope_lens is None else meta.rope_lens
    if scaling.kind == "dynamic":
        return rope_cos_sin(meta.positions, dynamic_inv_freq(dim, theta, scaling, length))
    if scaling.kind != "longrope":
        cos_sin = rope_cos_sin(meta.positions, rope_inv_freq(cfg.head_dim, theta, scaling, dim))
        return cos_sin if scaling.attention_factor == 1.0 else tuple(t * factor for t in cos_sin)
    short = rope_cos_sin(meta.positions, longrope_inv_freq(dim, theta, scaling.short_factor))
    long = rope_cos_sin(meta.positions, longrope_inv_freq(dim, theta, scaling.long_factor))
    use_long = (jnp.asarray(length) > scaling.original_max_position_embeddings)[:, None, None]
    return tuple(jnp.where(use_long, lg, sh) * factor for sh, lg in zip(short, long, strict=True))


class DecoderModel(nnx.Module):
    """Embedding, the layers (stacked for `lax.scan`, or an `nnx.List` run unrolled), final norm, head."""

    def __init__(self, cfg: ModelConfig, spec: FamilySpec, *, unrolled: bool = False):
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        if unrolled:
            self.layers = nnx.List([DecoderLayer(cfg, spec) for _ in range(cfg.num_layers)])
        else:
            make = nnx.vmap(lambda _: DecoderLayer(cfg, spec), in_axes=0, out_axes=0)
            self.layers = make(jnp.arange(cfg.num_layers))
        self.final_norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=spec.head_bias)
        )
        self.cfg = cfg

    def __call__(
        self,
        tokens: jax.Array,
        meta: AttentionMetadata,
        kv: KVCache,
        kernels: Kernels,
        inputs_embeds: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states `[B, T, hidden]` after the final norm, and the KV cache with this step written.
        `inputs_embeds`: (mask `[B, T]`, rows `[B, T, hidden]`), rows that replace the token embeddings
        where the mask is set (image features); the embedding scale applies to them as transformers does."""
        cfg = self.cfg
        dtype = value(self.final_norm.weight).dtype
        h = self.embed(tokens, dtype)
        if inputs_embeds is not None:
            mask, rows = inputs_embeds
            h = jnp.where(mask[..., None], rows.astype(dtype), h)
        if cfg.embedding_scale is not None:
            h = h * jnp.asarray(cfg.embedding_scale, h.dtype)
        rope = _rope(cfg, cfg.rope_theta, cfg.rope_scaling, meta)
        rope_local = rope
        if cfg.rope_local_theta is not None:
            rope_local = _rope(cfg, cfg.rope_local_theta, cfg.rope_local_scaling, meta)
        sliding_layers = cfg.sliding_layers

        if isinstance(self.layers, nnx.List):  # unrolled: each layer's kind is known here
            for i, layer in enumerate(self.layers):
                sliding = bool(sliding_layers[i])
                step = StepInputs(rope_local if sliding else rope, meta, kernels)
                h, kv = layer(h, step, kv, i, sliding)
            return self.final_norm(h, kernels), kv

        graph, stacked = nnx.split(self.layers)
        if jax.default_backend() == "cpu" and stacked_layer.CPU_IN_PLACE:  # few-row tiles read in place
            rows, gemm = math.prod(h.shape[:-1]), chosen_gemm_dtype(kernels)
            in_branches = IN_PLACE_UNDER_COND and mixes_layer_kinds(cfg) and rows <= CPU_GEMV_ROWS
            stacked, layer_of = stacked_layer.scan_packed_in_place(
                stacked, lambda w: in_branches or few_row_path(rows, w.fmt, gemm, w.out_in)
            )
        else:
            layer_of = None

        def body(carry: tuple[jax.Array, KVCache], xs: tuple) -> tuple[tuple[jax.Array, KVCache], None]:
            (h, kv), (state, index, sliding) = carry, xs
            if layer_of is not None:
                state = layer_of(state, index)
            if rope_local is rope or not any(sliding_layers):
                layer_rope = rope
            elif all(sliding_layers):
                layer_rope = rope_local
            else:  # mixed layers, each kind with its own RoPE base: pick per (traced) layer kind
                layer_rope = tuple(
                    jnp.where(sliding, loc, glob) for loc, glob in zip(rope_local, rope, strict=True)
                )
            layer = nnx.merge(graph, state)
            return layer(h, StepInputs(layer_rope, meta, kernels), kv, index, sliding), None

        # the cache rides in the carry (not xs/ys) so the donated buffer is updated in place
        indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        xs = (stacked, indices, jnp.asarray(sliding_layers, dtype=bool))
        (h, kv), _ = jax.lax.scan(body, (h, kv), xs)
        return self.final_norm(h, kernels), kv

    def logits(self, hidden: jax.Array, kernels: Kernels) -> jax.Array:
        """Logits in f32 (tied embeddings reuse the embedding matrix), soft-capped if the model says so."""
        cfg = self.cfg
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = head_logits(value(head), hidden, kernels)
        if self.lm_head is not None and self.lm_head.bias is not None:
            logits = logits + value(self.lm_head.bias).astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return logits


# -- the functional view: graph once, state as a pytree, merged inside the trace ------------------------


@functools.cache
def model_graph(cfg: ModelConfig, unrolled: bool = False) -> tuple[nnx.GraphDef, dict]:
    """The model's graph definition and its abstract state (a nested dict of `ShapeDtypeStruct`s: the
    shape every parameter must have), from building it abstractly: no memory, no initialization."""
    spec = family(cfg.architecture)
    graph, state = nnx.split(nnx.eval_shape(lambda: DecoderModel(cfg, spec, unrolled=unrolled)))
    return graph, state.to_pure_dict()


def merge(params: dict, cfg: ModelConfig) -> DecoderModel:
    """The model over `params` (stacked layers, or a tuple of per-layer trees: unrolled)."""
    unrolled = isinstance(params["layers"], tuple)
    if unrolled:
        params = {**params, "layers": dict(enumerate(params["layers"]))}
    return nnx.merge(model_graph(cfg, unrolled)[0], params)


# -- layer loops ------------------------------------------------------------------------------------------


def _pop_leaves(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, leaf) of every leaf of a nested dict, removing each from the tree as it is taken."""
    out = []
    for key in list(tree):
        node = tree.pop(key)
        if isinstance(node, dict):
            out += _pop_leaves(node, (*prefix, key))
        else:
            out.append(((*prefix, key), node))
    return out


def set_path(tree: dict, path: Sequence, leaf: object) -> None:
    """Put `leaf` at `path` in a nested dict, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = leaf


def unstack_layers(params: dict) -> None:
    """Split `params["layers"]` into a tuple of per-layer trees, each leaf its own buffer, so the model
    runs the layers unrolled and a dot reads its weight where it lies: XLA:CPU copies a `lax.scan`
    layer's slice out of the stack before YNNPACK's dot reads it. In place: each stacked leaf leaves the
    tree as soon as it is split, so memory grows by one stacked leaf at most."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    split: tuple[dict, ...] = tuple({} for _ in range(num_layers))
    for path, leaf in _pop_leaves(stacked):
        for i, layer in enumerate(split):
            set_path(layer, path, jax.tree.map(lambda a, i=i: a[i], leaf))
    params["layers"] = split


def stack_layers(params: dict) -> None:
    """`unstack_layers` undone, in place: one stacked tree, whose layers the model runs under `lax.scan`."""
    split = params["layers"]
    if not isinstance(split, tuple):
        return
    stacked: dict = {}
    params["layers"] = stacked
    per_layer = [_pop_leaves(layer) for layer in split]
    for n, (path, _) in enumerate(per_layer[0]):
        leaves = [layer[n][1] for layer in per_layer]
        for layer in per_layer:
            layer[n] = (path, None)  # drop the per-layer buffer as soon as it is stacked
        set_path(stacked, path, jax.tree.map(lambda *xs: jnp.stack(xs), *leaves))
