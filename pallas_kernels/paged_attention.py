"""Attention over a block-table (paged) KV cache.

Layout: the cache of every layer is one array `[layers, num_blocks, block_size, num_kv_heads, head_dim]`
and ops take a layer index into it: the model runs its layers under `lax.scan` with the cache in the
carry, so the (donated) cache is updated in place instead of being copied each step. A sequence's block
table lists the physical blocks holding its logical blocks 0, 1, 2...; token `i` of a sequence lives in
block `block_table[i // block_size]` at offset `i % block_size`. A slot is `block * block_size + offset`.

Queries come as a padded batch `[batch, q_len, num_heads, head_dim]` with the absolute position of each
query token: this one shape covers decode (q_len 1), whole-prompt prefill and chunked prefill on top of
a cached prefix. Query token at position p attends to the keys at positions <= p (and > p - window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked (padding) row gives zeros instead of NaN


def write_kv_xla(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values `[batch, q_len, kv_heads, head_dim]` into their slots of `layer`;
    slot -1 is padding."""
    num_blocks, block_size = k_cache.shape[1:3]
    slots = slot_mapping.reshape(-1)
    blocks = jnp.where(slots < 0, num_blocks, slots // block_size)  # out of range: dropped by the scatter
    offsets = slots % block_size

    def scatter(cache: jax.Array, new: jax.Array) -> jax.Array:
        new = new.reshape(-1, *new.shape[2:]).astype(cache.dtype)
        return cache.at[layer, blocks, offsets].set(new, mode="drop")

    return scatter(k_cache, k), scatter(v_cache, v)


def paged_attention_xla(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Reference: gather every page of the block table, mask by position and length, softmax in f32.

    q: [B, T, Hq, D]; caches: [layers, num_blocks, block_size, Hkv, D]; block_tables: [B, NB];
    positions: [B, T] absolute query positions; context_lens: [B] number of valid keys.
    Returns [B, T, Hq, D] in q's dtype.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[3]
    group = num_heads // num_kv_heads
    k = k_cache[layer, block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    v = v_cache[layer, block_tables].reshape(batch, -1, num_kv_heads, head_dim)
    qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(k.shape[1])[None, None, :]
    query_pos = positions[:, :, None]
    mask = (key_pos <= query_pos) & (key_pos < context_lens[:, None, None])
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
