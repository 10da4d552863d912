"""Run a model family directly over a paged KV cache with a shuffled (non-contiguous) block table."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.models.layers import AttentionMetadata, allocate_kv_cache
from jaxrs.models.registry import family
from jaxrs.ops import Kernels


class PagedRun:
    """Feeds token chunks of one sequence through `forward`, returning every position's logits."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        *,
        block_size: int = 16,
        num_blocks: int = 32,
        kernels: Kernels = Kernels(),
        seed: int = 0,
        dtype=jnp.float32,
    ):
        self.cfg, self.params, self.kernels, self.block_size = cfg, params, kernels, block_size
        self.kv = allocate_kv_cache(cfg, num_blocks, block_size, dtype)
        self.table = np.random.default_rng(seed).permutation(num_blocks).astype(np.int32)
        self.length = 0

    def feed(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        pos = np.arange(self.length, self.length + n, dtype=np.int32)
        slots = self.table[pos // self.block_size] * self.block_size + pos % self.block_size
        meta = AttentionMetadata(
            pos[None], slots[None].astype(np.int32), self.table[None], np.array([self.length + n], np.int32)
        )
        fam = family(self.cfg.architecture)
        hidden, self.kv = fam.forward(
            self.params, self.cfg, self.kernels, jnp.asarray([token_ids], jnp.int32), meta, self.kv
        )
        self.length += n
        return np.asarray(fam.compute_logits(self.params, self.cfg, hidden))[0]
