"""Continuous batching: which sequences run in the next step, and with how many tokens.

Running sequences go first (one decode token each, or their next prefill chunk); waiting sequences
are admitted first-come first-served while the token budget, `max_num_seqs` and the KV pool allow. A
prompt longer than the remaining budget is prefilled in chunks over several steps. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are released and it is recomputed later from its prompt plus its output so far (nothing is lost). A
waiting sequence waits at most `max_decode_steps` decode steps, the length of one multi-step call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from jaxrs.engine.block_manager import BlockManager
from jaxrs.engine.sequence import Sequence, Status

log = logging.getLogger("jaxrs")


@dataclasses.dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        """After this chunk the sequence's next token can be sampled."""
        return self.end == self.seq.num_tokens


@dataclasses.dataclass
class ScheduledStep:
    decode: list[Sequence]
    prefill: list[PrefillChunk]
    decode_steps: int = 1  # decode tokens per sequence in this step's single call

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_decode_steps: int,
        max_model_len: int,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_decode_steps = max_decode_steps
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, *, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        decode: list[Sequence] = []
        prefill: list[PrefillChunk] = []
        for seq in list(self.running):  # oldest first; the newest give way when blocks run out
            if seq.status is not Status.RUNNING:
                continue  # preempted below by an older sequence
            remaining = seq.num_tokens - seq.num_computed
            n = 1 if remaining == 1 else min(remaining, budget)
            if n <= 0:
                continue
            if not self._reserve(seq, seq.num_computed + n):
                continue
            budget -= n
            if remaining == 1:
                decode.append(seq)
            else:
                prefill.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.table.blocks:
                seq.num_computed = self.blocks.match_prefix(seq.table, seq.all_ids, seq.cache_key)
                seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.grow(seq.table, seq.num_computed + n):
                self.blocks.free(seq.table)  # hold nothing while waiting; the cache may still keep it
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            prefill.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
        steps = 1
        if decode and not prefill and not self.waiting and self.max_decode_steps > 1:
            steps = self._multi_step(decode)
        return ScheduledStep(decode, prefill, steps)

    def _multi_step(self, decode: list[Sequence]) -> int:
        """Run as many tokens in one call as every sequence can use, up to `max_decode_steps`: the step
        count is dynamic in the compiled step, so a request's last few tokens take one call, not one
        call each."""
        k = self.max_decode_steps
        for seq in decode:
            left = min(seq.params.max_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens + 1)
            if seq.needs_host_each_token:
                return 1
            k = min(k, left)
        if k > 1 and all(self.blocks.grow(seq.table, seq.num_tokens + k - 1) for seq in decode):
            return k
        return 1

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `seq` up to `num_tokens`, preempting newer sequences if needed."""
        while not self.blocks.grow(seq.table, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        log.info("preempting %s (%d tokens) for lack of KV blocks", seq.request_id, seq.num_tokens)
        self.num_preemptions += 1
        self._requeue(seq)

    def release_all(self) -> int:
        """Take every block back so the pool can be rebuilt (new weights): running sequences return to
        the front of the queue in their order, and every sequence recomputes its tokens when admitted
        again. Returns how many were running."""
        running = list(self.running)
        for seq in reversed(running):
            self._requeue(seq)
        for seq in self.waiting:  # forked samples wait holding their parent's prompt blocks
            self.blocks.free(seq.table)
            seq.num_computed = 0
        return len(running)

    def take_over(self, old: Scheduler) -> None:
        """Carry on `old`'s work on this scheduler's pool (new weights): its queue, whose sequences hold
        no blocks after `old.release_all()`, and its counters."""
        if old.running:
            raise RuntimeError("release_all() the old scheduler before handing its queue over")
        self.waiting, self.num_preemptions = old.waiting, old.num_preemptions

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        self.add(seq, front=True)
