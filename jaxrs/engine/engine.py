"""The engine loop: admit waiting sequences, run prefill or a batched decode step, apply stops.

Each step either prefills one waiting sequence (in chunks of at most `max_num_batched_tokens`) or
decodes every running sequence together. When the pool runs out of blocks the newest running sequence
is preempted: its blocks are freed and it is recomputed later from its prompt plus its output so far,
so no output is lost.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections import deque

import jax.numpy as jnp

from jaxrs.engine.block_manager import BlockManager
from jaxrs.engine.runner import ModelRunner, Row
from jaxrs.engine.sampling import SamplingParams
from jaxrs.engine.sequence import Sequence, Status
from jaxrs.errors import JaxrsError
from jaxrs.loading import LoadedModel
from jaxrs.ops import Kernels
from jaxrs.tokenizer import IncrementalDetokenizer

log = logging.getLogger("jaxrs")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs."""

    block_size: int = 16
    kv_cache_mb: float = 512.0
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    seed: int = 0


def kv_bytes_per_token(loaded: LoadedModel, dtype: jnp.dtype) -> int:
    cfg = loaded.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        *,
        kernels: Kernels = Kernels(),
        dtype: jnp.dtype = jnp.float32,
    ):
        self.model = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        per_token = kv_bytes_per_token(loaded, dtype)
        num_blocks = max(1, int(config.kv_cache_mb * 2**20) // (per_token * config.block_size))
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings, num_blocks * config.block_size
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.runner = ModelRunner(
            loaded.config,
            loaded.params,
            num_blocks=num_blocks,
            block_size=config.block_size,
            kernels=kernels,
            dtype=dtype,
            max_tokens_per_step=config.max_num_batched_tokens,
        )
        log.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB (%d bytes/token), up to %d tokens at once",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size * per_token / 2**20,
            per_token,
            num_blocks * config.block_size,
        )
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- requests -----------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Sequence:
        if not prompt_ids:
            raise JaxrsError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise JaxrsError(
                f"the prompt has {len(prompt_ids)} tokens; this engine serves at most "
                f"{self.max_model_len} tokens per sequence"
            )
        params = params.with_defaults(self.model.generation_config)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, seed, detok)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one model step; returns the sequences that received a token (or finished)."""
        seq = self._next_prefill()
        if seq is not None:
            return self._prefill(seq)
        if self.running:
            return self._decode()
        return []

    def _next_prefill(self) -> Sequence | None:
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return None
        seq = self.waiting[0]
        chunk = min(seq.num_tokens - seq.num_computed, self.config.max_num_batched_tokens)
        needed = self.blocks.blocks_needed(seq.num_computed + chunk + 1) - len(seq.block_table)
        if not self.blocks.can_allocate(needed):
            if not self.running:
                raise JaxrsError(
                    f"the KV cache ({self.blocks.num_blocks} blocks) cannot hold one sequence "
                    f"of {seq.num_tokens} tokens; give it more memory"
                )
            return None  # wait for running sequences to finish
        return seq

    def _prefill(self, seq: Sequence) -> list[Sequence]:
        ids = seq.all_ids
        chunk = ids[seq.num_computed : seq.num_computed + self.config.max_num_batched_tokens]
        end = seq.num_computed + len(chunk)
        self.blocks.ensure_capacity(seq.block_table, end)
        last_chunk = end == len(ids)
        row = Row(
            chunk, seq.num_computed, seq.block_table, last_chunk, seq.params, seq.seed, len(seq.output_ids)
        )
        tokens, _ = self.runner.execute([row])
        seq.num_computed = end
        if not last_chunk:
            return []
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        self._append(seq, int(tokens[0]))
        return [seq]

    def _decode(self) -> list[Sequence]:
        for seq in list(self.running):  # oldest first; the newest give way
            if seq not in self.running:
                continue
            needed = self.blocks.blocks_needed(seq.num_tokens) - len(seq.block_table)
            while not self.blocks.can_allocate(needed):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.ensure_capacity(seq.block_table, seq.num_tokens)
        rows = [
            Row([s.all_ids[-1]], s.num_tokens - 1, s.block_table, True, s.params, s.seed, len(s.output_ids))
            for s in self.running
        ]
        if not rows:
            return []
        tokens, _ = self.runner.execute(rows)
        batch = list(self.running)
        for seq, token in zip(batch, tokens, strict=True):
            seq.num_computed = seq.num_tokens
            self._append(seq, int(token))
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed from prompt + output when readmitted."""
        log.info("preempting %s (%d tokens) for lack of KV blocks", seq.request_id, seq.num_tokens)
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    # -- stops --------------------------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int) -> None:
        p = seq.params
        seq.output_ids.append(token)
        eos = set(self.tokenizer.eos_token_ids) | set(self.model.config.eos_token_ids)
        if token in p.stop_token_ids or (token in eos and not p.ignore_eos):
            return self._finish(seq, "stop")
        before = len(seq.text)
        seq.text += seq.detokenizer.push(token)
        for stop in p.stop:
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                seq.text = seq.text[:at]
                return self._finish(seq, "stop")
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
