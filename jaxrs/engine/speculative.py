"""Speculative decoding inside the continuous-batching engine: K draft tokens for every running sequence,
verified by the target in one call over K + 1 positions per row.

Proposals come from a draft model (`method: draft_model`) or from the sequence's own tokens (`ngram`,
see `ngram_proposer`). A draft model has its own paged KV pool, as many blocks as the target's, indexed
by the same block tables: the block manager allocates, frees, preempts and prefix-caches both pools at
once, and the draft prefills every chunk the target prefills. One jitted call drafts K tokens for all
rows (a `lax.while_loop`, as the decode step), keeping each row's draft distribution q; one jitted call
runs the target over [last token, d_1..d_K] (the prefill path's chunk attention over the paged cache),
applies the request's processors to every position, and keeps the accepted prefix by the exact rule
(`rejection_sampling`). Rolling back is a length change: the K/V written past the accepted tokens lies
beyond `num_computed`, is overwritten by the next step, and never reaches the prefix cache (blocks are
registered only up to `num_computed`). Stale draft K/V can lower acceptance, never change the output.

The draft's cache may trail the target's by one token (when all K drafts are kept, d_K was never fed to
the draft): such a row feeds two tokens before drafting, and the call runs K + 1 iterations. A sequence
that decoded without speculating (no blocks for K more tokens then) has its draft cache prefilled up to
date before its next draft.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.engine.adaptive_k import DraftRecord, next_k
from jaxrs.engine.compiled_steps import CompiledSteps, StepCall
from jaxrs.engine.ngram_proposer import propose
from jaxrs.engine.rejection_sampling import DRAFT_SALT, salted, verify
from jaxrs.engine.runner import ModelRunner, one_token_logits, profile, step_flags
from jaxrs.engine.sampling import (
    SampleOutput,
    SamplingFlags,
    SamplingParams,
    build_sampling_batch,
    pick,
    process_logits,
    token_logprobs,
)
from jaxrs.engine.sequence import Sequence
from jaxrs.engine.speculative_config import SpeculativeConfig
from jaxrs.errors import JaxrsError
from jaxrs.loading import LoadedModel
from jaxrs.models.decoder import merge

log = logging.getLogger("jaxrs")


# -- loading the draft ----------------------------------------------------------------------------------
def check_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """The draft must score the target's tokens: same vocabulary size, same token at every id."""
    t_size, d_size = target.config.vocab_size, draft.config.vocab_size
    if t_size != d_size:
        raise JaxrsError(
            f"the draft model's vocabulary ({d_size} tokens, {draft.source}) differs from the target's "
            f"({t_size} tokens, {target.source})"
        )
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    for i in range(min(t_tok.vocab_size, d_tok.vocab_size)):
        if t_tok.id_to_token(i) != d_tok.id_to_token(i):
            raise JaxrsError(
                f"the draft model's vocabulary differs from the target's at token {i}: "
                f"{d_tok.id_to_token(i)!r} in the draft, {t_tok.id_to_token(i)!r} in the target"
            )


def load_draft(config: SpeculativeConfig, target: LoadedModel, dtype: jnp.dtype) -> LoadedModel | None:
    """The draft model a `draft_model` config names, loaded with its own options (None for ngram)."""
    if config.method != "draft_model":
        return None
    from jaxrs.loading import load_model

    draft = load_model(
        config.model,
        gguf_file=config.gguf_file,
        dtype=config.dtype or dtype,
        packed=config.packed,
        isq=config.isq,
    )
    check_vocabulary(target, draft)
    return draft


# -- the jitted steps -----------------------------------------------------------------------------------
def _draft(
    params, kv, first, lag, start, tables, valid, batch, history_len, num_steps, *, cfg, kernels, flags, k
):
    """Draft k tokens per row. Row i feeds `first[i, :lag[i] + 1]` (its tokens the draft has not seen,
    the last token included) from position `start[i]`, then its own drafts; `num_steps` (k or k + 1)
    iterations, static bound k + 1. Returns drafts [B, k] and, for sampled batches, q [B, k, V] (the
    draft's probabilities after the request's processors; else [B, k, 1] zeros)."""
    b = first.shape[0]
    rows = jnp.arange(b)
    drafts = jnp.zeros((b, k), jnp.int32)
    q = jnp.zeros((b, k, 1 if flags.all_greedy else cfg.vocab_size), jnp.float32)
    seeds = salted(batch["seed"], DRAFT_SALT)
    history = batch.get("output_ids", jnp.zeros((b, 0), jnp.int32))

    def one(state):
        i, carry, drafts, q = state
        # As the decode step: tie the weights to the carry so XLA cannot hoist work on them out of the loop.
        step_params, (kv, prev, history) = jax.lax.optimization_barrier((params, carry))
        tok = jnp.where(i <= lag, first[rows, jnp.minimum(i, 1)], prev)
        logits, kv = one_token_logits(step_params, cfg, kernels, kv, tok, start + i, tables, valid)
        j = i - lag  # which draft this iteration's sample is (negative: a catch-up token's)
        at = jnp.where(j >= 0, j, k)  # k: out of range, dropped
        row_batch = {**batch, "seed": seeds, "step": batch["step"] + j}
        if flags.penalties:
            row_batch["output_ids"] = history
        processed = process_logits(logits, row_batch, flags)
        new = pick(processed, row_batch, flags)
        drafts = drafts.at[rows, at].set(new, mode="drop")
        if not flags.all_greedy:
            q = q.at[rows, at].set(jax.nn.softmax(processed, axis=-1), mode="drop")
        if flags.penalties:
            history = history.at[rows, jnp.where(j >= 0, history_len + j, history.shape[1])].set(
                new, mode="drop"
            )
        return i + 1, (kv, new, history), drafts, q

    state = (jnp.int32(0), (kv, first[:, 0], history), drafts, q)
    _, (kv, _, _), drafts, q = jax.lax.while_loop(lambda s: s[0] < num_steps, one, state)
    return (drafts, q), kv


def _verify(params, kv, tokens, meta, drafts, q, num_drafts, batch, *, cfg, kernels, flags, one_hot):
    """Run the target over [B, k + 1] tokens (the last token, then the drafts), process every position's
    logits with its row's sampling batch (B * (k + 1) rows: position j's history holds drafts[:j]) and keep
    the accepted prefix. Returns SampleOutput arrays as [k + 1, B, ...] (a decode step's layout) and the
    accepted counts [B]."""
    b, t = tokens.shape
    model = merge(params, cfg)
    hidden, kv = model(tokens, meta, kv, kernels)
    logits = model.logits(hidden, kernels).astype(jnp.float32).reshape(b * t, -1)
    processed = process_logits(logits, batch, flags).reshape(b, t, -1)
    first = {name: batch[name].reshape(b, t)[:, 0] for name in ("temperature", "seed", "step")}
    verdict = verify(
        processed,
        drafts,
        None if one_hot or flags.all_greedy else q,
        num_drafts,
        first["temperature"] <= 0,
        first["seed"],
        first["step"],
    )
    out = token_logprobs(logits, verdict.tokens.reshape(-1), flags)
    out = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(b, t, *a.shape[1:]), 0, 1), out)
    return (out, verdict.num_accepted), kv


class SpecSteps(NamedTuple):
    draft: Callable
    verify: Callable


@functools.cache
def jitted_spec_steps(xla_options: tuple[tuple[str, str], ...] = ()) -> SpecSteps:
    jit = functools.partial(jax.jit, donate_argnames=("kv",), compiler_options=dict(xla_options) or None)
    return SpecSteps(
        draft=jit(_draft, static_argnames=("cfg", "kernels", "flags", "k")),
        verify=jit(_verify, static_argnames=("cfg", "kernels", "flags", "one_hot")),
    )


# -- counters -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SpecDecodeStats:
    """vLLM's counters: drafts (rows verified), draft tokens proposed, tokens accepted, and accepted
    tokens by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified row: 1 + accepted drafts per draft."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def count(self, num_drafts: Seq[int], accepted: Seq[int]) -> None:
        for proposed, kept in zip(num_drafts, accepted, strict=True):
            if not proposed:
                continue
            self.num_drafts += 1
            self.num_draft_tokens += proposed
            self.num_accepted_tokens += kept
            for j in range(kept):
                self.accepted_per_position[j] += 1


# -- the speculator -------------------------------------------------------------------------------------
def may_speculate(seq: Sequence) -> bool:
    """Whether `seq` can ever speculate: it allows it, and it has no grammar (a matcher cannot roll
    back) and no adapter (the verify step runs none). A request that cannot skips the draft's prefill,
    which would otherwise cost it as much as the target's (a prefix it registers in the cache then
    holds no draft K/V: a later speculating request sharing it stays exact, with fewer drafts kept)."""
    return bool(seq.params.speculative) and seq.grammar is None and seq.params.lora is None


class Speculator:
    """Proposes and verifies for the engine. `target` is the engine's runner; a draft model gets a runner
    of its own over as many blocks (the engine's block tables index both pools)."""

    def __init__(self, config: SpeculativeConfig, target: ModelRunner, draft: LoadedModel | None):
        self.config = config
        self.k = config.num_speculative_tokens
        self.target = target
        self.steps = jitted_spec_steps(target.xla_options)
        self.verifying = CompiledSteps(self.steps, target.params, target.kv)
        self.draft: ModelRunner | None = None
        if draft is not None:
            self.draft = target.paired(draft.config, draft.params)
            self.drafting = CompiledSteps(self.steps, self.draft.params, self.draft.kv)
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        # The positions of a sequence the draft's cache holds (a prefix), and after a draft call the
        # positions it wrote up to and the sequence's length then.
        self._held: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._pending: weakref.WeakKeyDictionary[Sequence, tuple[int, int]] = weakref.WeakKeyDictionary()
        self._records: weakref.WeakKeyDictionary[Sequence, DraftRecord] = weakref.WeakKeyDictionary()

    def compile_count(self) -> int:
        return len(self.verifying) + (len(self.draft.compiled) + len(self.drafting) if self.draft else 0)

    def release(self) -> None:
        if self.draft is not None:
            self.draft.release()

    def wants(self, seq: Sequence, max_model_len: int) -> bool:
        """Whether `seq` speculates this step: it may at all (`may_speculate`), K + 1 positions fit, and
        more than one token is left to generate."""
        left = seq.params.max_tokens - len(seq.output_ids)
        return may_speculate(seq) and left > 1 and seq.num_tokens + self.k <= max_model_len

    # -- warm-up ----------------------------------------------------------------------------------------
    def warmup_calls(self, profiles: Seq[SamplingParams]) -> list[tuple[CompiledSteps, StepCall]]:
        """Every verify and draft shape (each batch bucket and block-table width, per sampling profile)
        and the draft's prefill shapes: the calls speculation adds to the engine's warm-up."""
        target, k = self.target, self.k
        widths = target.widths()
        batches = sorted({target.rows(n) for n in range(1, target.max_num_seqs + 1)})
        calls = []
        for params in profiles:
            for b in batches:
                for w in widths:
                    batch, flags = target.profile_batch(params, b * (k + 1), greedy_apart=True)
                    batch.pop("token_mask")  # constrained rows never speculate: these steps take no mask
                    zeros = np.zeros(b, np.int32)
                    q = jnp.zeros(
                        (b, k, 1 if flags.all_greedy or self.draft is None else target.cfg.vocab_size)
                    )
                    args = (np.zeros((b, k + 1), np.int32), target._metadata([], b, k + 1, w))
                    args += (np.zeros((b, k), np.int32), q, zeros, batch)
                    statics = dict(
                        cfg=target.cfg, kernels=target.kernels, flags=flags, one_hot=self.draft is None
                    )
                    calls.append(
                        (self.verifying, StepCall("verify", args, statics, (b, k + 1, w, profile(flags))))
                    )
                    if self.draft is None:
                        continue
                    arrays, flags = self.draft.profile_batch(params, b, greedy_apart=True)
                    arrays.pop("token_mask")
                    flags = dataclasses.replace(flags, top_logprobs=0)
                    tables, valid = np.zeros((b, w), np.int32), np.zeros(b, bool)
                    args = (
                        np.zeros((b, 2), np.int32),
                        zeros,
                        zeros,
                        tables,
                        valid,
                        arrays,
                        zeros,
                        np.int32(k),
                    )
                    statics = dict(cfg=self.draft.cfg, kernels=self.draft.kernels, flags=flags, k=k)
                    calls.append((self.drafting, StepCall("draft", args, statics, (b, w, profile(flags)))))
        if self.draft is not None:
            calls += [
                (self.draft.compiled, c) for c in self.draft.warmup_calls(profiles)[0] if c.kind == "prefill"
            ]
        return calls

    def warmup(self, profiles: Seq[SamplingParams]) -> int:
        """Compile `warmup_calls` now; returns how many."""
        calls = self.warmup_calls(profiles)
        for compiled, call in calls:
            compiled.get(call, "in warm-up")
        return len(calls)

    # -- prefill ----------------------------------------------------------------------------------------
    def prefill(self, chunks: Seq[tuple[Sequence, int, int]]) -> None:
        """Run the draft over the chunks the target prefilled (its cache then matches the target's)."""
        chunks = [c for c in chunks if may_speculate(c[0])]  # the others never read the draft's cache
        if self.draft is None or not chunks:
            return
        self.draft.prefill(chunks)
        for seq, _, end in chunks:
            self._held[seq] = end

    # -- one speculative step ---------------------------------------------------------------------------
    def step(self, seqs: list[Sequence]) -> tuple[SampleOutput, np.ndarray]:
        """Propose and verify for `seqs` (each holds blocks for num_tokens + K tokens). Returns SampleOutput
        arrays [K + 1, len(seqs), ...] and each row's accepted count: row i emits tokens [0, accepted + 1)."""
        k, target = self.k, self.target
        b = target.rows(len(seqs))
        w = target.width(max(len(s.table.blocks) for s in seqs))
        ks = [next_k(k, self._records.get(s)) if self.config.adaptive_k else k for s in seqs]
        if self.draft is None:
            proposals = [
                propose(s.all_ids, ks[i], self.config.prompt_lookup_max, self.config.prompt_lookup_min)
                for i, s in enumerate(seqs)
            ]
            drafts = np.zeros((b, k), np.int32)
            num_drafts = np.zeros(b, np.int32)
            for i, p in enumerate(proposals):
                drafts[i, : len(p)], num_drafts[i] = p, len(p)
            q = jnp.zeros((b, k, 1), jnp.float32)
        else:
            drafts, q = self._draft(seqs, b, w, ks)
            num_drafts = np.zeros(b, np.int32)
            num_drafts[: len(seqs)] = ks
        tokens = np.zeros((b, k + 1), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, 0], tokens[i, 1:] = s.all_ids[-1], drafts[i]
        meta = target._metadata([(s.table.blocks, s.num_tokens - 1, k + 1, None) for s in seqs], b, k + 1, w)
        batch, flags = self._sampling(seqs, drafts, b)
        call = StepCall(
            "verify",
            (tokens, meta, drafts, q, num_drafts, batch),
            dict(cfg=target.cfg, kernels=target.kernels, flags=flags, one_hot=self.draft is None),
            (b, k + 1, w, profile(flags)),
        )
        rows = len(seqs)
        out, accepted = target._run(
            call,
            lambda o: (
                jax.tree.map(lambda a: np.asarray(a)[:, :rows], o[0]),
                np.asarray(o[1])[:rows],
            ),
            self.verifying,
        )
        self.stats.count(num_drafts[:rows].tolist(), accepted.tolist())
        for s, proposed, kept in zip(seqs, num_drafts[:rows].tolist(), accepted.tolist(), strict=True):
            self._records.setdefault(s, DraftRecord()).add(proposed, kept)
        return out, accepted

    def finished(self, seq: Sequence) -> None:
        """Log a finished sequence's acceptance (the request's line) and forget its counts."""
        record = self._records.pop(seq, None)
        if record is not None and record.steps:
            log.info(
                "%s: %d tokens, %d verify steps, %d drafts proposed, acceptance %.2f, "
                "mean accepted length %.2f",
                seq.request_id if seq.index == 0 else f"{seq.request_id}[{seq.index}]",
                len(seq.output_ids),
                record.steps,
                record.proposed,
                record.acceptance_rate,
                record.mean_accepted_length,
            )

    def _draft(self, seqs: list[Sequence], b: int, w: int, ks: list[int]) -> tuple[np.ndarray, jax.Array]:
        """The draft model's tokens per row, at least `ks[i]` for row i, at most K (on the host), and its q
        (on the device)."""
        k, draft = self.k, self.draft
        first = np.zeros((b, 2), np.int32)
        lag = np.zeros(b, np.int32)
        start = np.zeros(b, np.int32)
        tables = np.zeros((b, w), np.int32)
        valid = np.zeros(b, bool)
        for s in seqs:  # tokens decoded without the draft (no blocks to speculate then): catch up first
            while self._held.get(s, 0) < s.num_tokens - 2:
                held = self._held.get(s, 0)
                end = min(s.num_tokens - 1, held + self.draft.max_chunk)
                self.draft.prefill([(s, held, end)])
                self._held[s] = end
        for i, s in enumerate(seqs):
            lag[i] = s.num_tokens - 1 - self._held.get(s, 0)  # 0, or 1 when d_K was kept last step
            first[i, : lag[i] + 1] = s.all_ids[len(s.all_ids) - 1 - lag[i] :]
            start[i], valid[i] = s.num_tokens - 1 - lag[i], True
            tables[i, : len(s.table.blocks)] = s.table.blocks
        num_steps = int(max(n + int(lag[i]) for i, n in enumerate(ks)))  # at most K + 1, the static bound
        arrays, flags = build_sampling_batch(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [len(s.output_ids) for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids + [self.target.cfg.vocab_size] * k for s in seqs],  # room for the drafts
            b,
            self.target.cfg.vocab_size,
        )
        flags = dataclasses.replace(step_flags(flags, greedy_apart=True), top_logprobs=0)
        history_len = np.zeros(b, np.int32)
        history_len[: len(seqs)] = [len(s.output_ids) for s in seqs]
        call = StepCall(
            "draft",
            (first, lag, start, tables, valid, arrays, history_len, np.int32(num_steps)),
            dict(cfg=draft.cfg, kernels=draft.kernels, flags=flags, k=k),
            (b, w, profile(flags)),
        )
        drafts, q = draft._run(call, lambda o: (np.asarray(o[0]), o[1]), self.drafting)
        for i, s in enumerate(seqs):  # what the draft's cache holds now, for `settle`
            self._pending[s] = (int(start[i]) + num_steps, s.num_tokens)
        return drafts, q

    def settle(self, seq: Sequence, accepted: int) -> None:
        """After row `seq` kept `accepted` drafts: how far the draft's cache trails the target's."""
        if self.draft is None or seq not in self._pending:
            return
        written, num_tokens = self._pending.pop(seq)
        self._held[seq] = min(written, num_tokens + accepted)

    def _sampling(self, seqs: list[Sequence], drafts: np.ndarray, b: int) -> tuple[dict, SamplingFlags]:
        """The verify step's sampling rows: row i * (K + 1) + j is sequence i's position j, whose token
        index is len(output) + j and whose history holds drafts[:j]."""
        t = self.k + 1
        params: list[SamplingParams] = []
        seeds, steps, prompts, outputs = [], [], [], []
        for i, s in enumerate(seqs):
            for j in range(t):
                params.append(s.params)
                seeds.append(s.seed)
                steps.append(len(s.output_ids) + j)
                prompts.append(s.prompt_ids)
                outputs.append(s.output_ids + drafts[i, :j].tolist() if s.params.has_penalties else [])
        arrays, flags = build_sampling_batch(
            params, seeds, steps, prompts, outputs, b * t, self.target.cfg.vocab_size
        )
        return arrays, step_flags(flags, greedy_apart=True)
