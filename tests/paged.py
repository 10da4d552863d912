"""Run a model family directly over a paged KV cache with a shuffled (non-contiguous) block table."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.models.decoder import merge
from jaxrs.models.layers import AttentionMetadata, allocate_kv_cache
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

    def feed(self, token_ids: list[int], inputs_embeds: np.ndarray | None = None) -> np.ndarray:
        n = len(token_ids)
        pos = np.arange(self.length, self.length + n, dtype=np.int32)
        slots = self.table[pos // self.block_size] * self.block_size + pos % self.block_size
        meta = AttentionMetadata(
            pos[None], slots[None].astype(np.int32), self.table[None], np.array([self.length + n], np.int32)
        )
        model = merge(self.params, self.cfg)
        embeds = None
        if inputs_embeds is not None:
            rows = jnp.asarray(inputs_embeds)[None]
            embeds = (jnp.ones(rows.shape[:2], bool), rows)
        tokens = jnp.asarray([token_ids], jnp.int32)
        hidden, self.kv = model(tokens, meta, self.kv, self.kernels, inputs_embeds=embeds)
        self.length += n
        return np.asarray(model.logits(hidden, Kernels()))[0]


def assert_matches_transformers(
    name: str, cfg: ModelConfig, params: dict, ref, prompt_len: int, steps: int
) -> None:
    """Logits over a random prompt, then `steps` greedy decode steps (each side from its own logits),
    through the paged cache with a shuffled block table: same tokens, max relative error <= 1e-4."""
    import torch

    from tests.conftest import relative_error

    vocab = cfg.vocab_size
    prompt = np.random.default_rng(1).integers(0, vocab, prompt_len).tolist()
    run = PagedRun(cfg, params, block_size=8, num_blocks=16, seed=3)
    ours = [run.feed(prompt)]
    ids = list(prompt)
    with torch.no_grad():
        theirs = [ref(torch.tensor([ids])).logits[0].numpy()]
    for _ in range(steps):
        ours_next = int(np.argmax(ours[-1][-1]))
        assert ours_next == int(np.argmax(theirs[-1][-1]))
        ids.append(ours_next)
        ours.append(run.feed([ours_next]))
        with torch.no_grad():
            theirs.append(ref(torch.tensor([ids])).logits[0, -1:].numpy())
    ours_all, theirs_all = np.concatenate(ours), np.concatenate(theirs)
    assert ours_all.shape == (prompt_len + steps, vocab)
    err = relative_error(ours_all, theirs_all)
    print(f"{name}: max relative logit error {err:.2e}")
    assert err <= 1e-4
