"""Runs one jitted model step over a padded, bucketed batch and samples on device.

Shapes are bucketed (batch rows, tokens per row, blocks per row, each to a power of two) so the number
of compilations is small and logged. The KV cache is donated into each step so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.engine.sampling import SamplingParams, sample, sampling_arrays
from jaxrs.models.layers import AttentionMetadata, KVCache, allocate_kv_cache
from jaxrs.models.registry import family
from jaxrs.ops import Kernels

log = logging.getLogger("jaxrs")


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The next power of two >= n (at least `minimum`, at most `maximum` when n fits under it)."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(size, maximum) if maximum is not None and n <= maximum else size


@dataclasses.dataclass
class Row:
    """One sequence's share of a step: tokens to run from `start`, and whether to sample after them."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool
    params: SamplingParams
    seed: int
    step: int  # index of the token being sampled, for the per-request RNG stream


@functools.partial(jax.jit, static_argnames=("cfg", "kernels", "all_greedy"), donate_argnames=("kv",))
def _step(params, kv, tokens, meta, last_index, arrays, *, cfg, kernels, all_greedy):
    fam = family(cfg.architecture)
    hidden, kv = fam.forward(params, cfg, kernels, tokens, meta, kv)
    last = hidden[jnp.arange(hidden.shape[0]), last_index]
    logits = fam.compute_logits(params, cfg, last)
    next_tokens = sample(logits, arrays, all_greedy=all_greedy)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, next_tokens[:, None], axis=-1)[:, 0]
    return next_tokens, chosen, kv


class ModelRunner:
    """Owns the parameters and the preallocated KV pool; turns rows into one jitted call."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        *,
        num_blocks: int,
        block_size: int,
        kernels: Kernels,
        dtype: jnp.dtype,
        max_tokens_per_step: int,
    ):
        self.cfg = cfg
        self.params = params
        self.kernels = kernels
        self.block_size = block_size
        self.max_tokens_per_step = max_tokens_per_step
        self.kv: KVCache = allocate_kv_cache(cfg, num_blocks, block_size, dtype)
        self.compiled_shapes: set[tuple] = set()

    def execute(self, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Run the rows; returns (sampled token, its logprob) per row (meaningful where row.sample)."""
        batch = bucket(len(rows))
        longest = max(len(r.token_ids) for r in rows)
        q_len = 1 if longest == 1 else bucket(longest, minimum=16, maximum=self.max_tokens_per_step)
        width = bucket(max(len(r.block_table) for r in rows), minimum=4)
        tokens = np.zeros((batch, q_len), np.int32)
        positions = np.zeros((batch, q_len), np.int32)
        slots = np.full((batch, q_len), -1, np.int32)
        tables = np.zeros((batch, width), np.int32)
        context = np.zeros((batch,), np.int32)
        last = np.zeros((batch,), np.int32)
        for i, r in enumerate(rows):
            n = len(r.token_ids)
            pos = np.arange(r.start, r.start + n)
            tokens[i, :n] = r.token_ids
            positions[i, :n] = pos
            table = np.asarray(r.block_table, np.int32)
            slots[i, :n] = table[pos // self.block_size] * self.block_size + pos % self.block_size
            tables[i, : len(table)] = table
            context[i] = r.start + n
            last[i] = n - 1
        sampled = [r for r in rows if r.sample]
        all_greedy = all(r.params.greedy for r in sampled)
        arrays = sampling_arrays(
            [r.params for r in rows], [r.seed for r in rows], [r.step for r in rows], batch
        )
        meta = AttentionMetadata(positions, slots, tables, context)
        shape = (batch, q_len, width, all_greedy)
        fresh = shape not in self.compiled_shapes
        start = time.perf_counter()
        next_tokens, logprobs, self.kv = _step(
            self.params,
            self.kv,
            tokens,
            meta,
            last,
            arrays,
            cfg=self.cfg,
            kernels=self.kernels,
            all_greedy=all_greedy,
        )
        next_tokens, logprobs = np.asarray(next_tokens), np.asarray(logprobs)
        if fresh:
            self.compiled_shapes.add(shape)
            log.info(
                "compiled step for batch=%d tokens=%d blocks=%d greedy=%s in %.1f s (%d shapes so far)",
                batch,
                q_len,
                width,
                all_greedy,
                time.perf_counter() - start,
                len(self.compiled_shapes),
            )
        return next_tokens[: len(rows)], logprobs[: len(rows)]
