"""The packed token mask: one bit per vocabulary entry, 32 to an int32 word, a row per batch row.

The sampler always takes it (free rows all ones), so its shape, [B, ceil(V / 32)], never adds a
compiled variant. Masked-out tokens become -inf before every other logits processor, so penalties,
top-k and top-p act on allowed tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mask_words(vocab_size: int) -> int:
    """int32 words per row for a `vocab_size` vocabulary."""
    return -(-vocab_size // 32)


def all_allowed(rows: int, vocab_size: int) -> np.ndarray:
    """A [rows, words] mask that allows every token."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)


def allowed(mask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, words] packed int32 -> [B, vocab_size] bool (bit j of word w is token 32 w + j)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (mask.astype(jnp.uint32)[:, :, None] >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Logits with disallowed tokens at -inf."""
    return jnp.where(allowed(mask, logits.shape[-1]), logits, -jnp.inf)


def unpack(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Host-side `allowed`, for tests and checks: [B, words] -> [B, vocab_size] bool."""
    bits = (mask.view(np.uint32)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].astype(bool)
