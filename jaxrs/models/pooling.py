"""Pooling token states into one sentence vector, as sentence-transformers' `Pooling` module defines each
mode, over right-padded rows (`lengths[b]` real tokens in row b). Pure functions, in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# sentence-transformers' config keys, in the order its Pooling module concatenates the modes' vectors
MODES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def pool(hidden: jax.Array, lengths: jax.Array, modes: tuple[str, ...]) -> jax.Array:
    """`[B, T, H]` token states -> `[B, H * len(modes)]`, each mode's vector in `MODES` order."""
    h = hidden.astype(jnp.float32)
    mask = (jnp.arange(h.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]
    count = jnp.maximum(lengths.astype(jnp.float32), 1e-9)[:, None]
    summed = jnp.sum(h * mask, axis=1)
    out = []
    for mode in MODES:
        if mode not in modes:
            continue
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(jnp.max(jnp.where(mask > 0, h, -1e9), axis=1))
        elif mode == "mean":
            out.append(summed / count)
        elif mode == "mean_sqrt_len":
            out.append(summed / jnp.sqrt(count))
        elif mode == "weightedmean":
            weights = mask * jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
            out.append(jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9))
        else:  # lasttoken
            out.append(h[jnp.arange(h.shape[0]), jnp.maximum(lengths - 1, 0)])
    return jnp.concatenate(out, axis=-1)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Unit rows, as torch's `F.normalize` (norms below 1e-12 are taken as 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
