"""Runs jitted model steps over padded, bucketed batches, sampling on device.

Jitted functions: `prefill` (a chunk of tokens per sequence, for one sequence or several short
ones, then a sample each), `decode` (one or more tokens for every running sequence in one call: a
`lax.while_loop` over a dynamic step count feeds each sampled token back on device), and `score`
(log-probabilities of given next tokens). A decode batch holding a constrained row (a grammar) runs
as `logits` then `sample` instead, so its token masks are filled on the host while the device runs
the forward pass (`jaxrs.engine.masked_decode`). Shapes are bucketed to powers of two (batch rows,
exact up to `qmatmul.CPU_GEMV_ROWS` on CPU; chunk length up to `CHUNK_STEP`; block-table width), so
compilations are few and logged; each compiles once, ahead of use (`warmup`, in the background while
serving if asked) or on first use (`CompiledSteps`). The KV cache is donated into every call and
updated in place. XLA compiler options for the steps (`STEP_XLA_OPTIONS` per platform, or the engine's
own) are given per jitted function, so they never touch the user's other computations.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from collections.abc import Sequence as Seq
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.engine.compiled_steps import CompiledSteps, StepCall
from jaxrs.engine.masked_decode import is_held, masked_decode, masked_warmup_calls
from jaxrs.engine.sampling import SampleOutput, SamplingFlags, SamplingParams, build_sampling_batch, sample
from jaxrs.engine.sequence import Sequence
from jaxrs.engine.warmup import Warmup
from jaxrs.errors import JaxrsError
from jaxrs.lora.weight import bind_slots
from jaxrs.models.decoder import merge
from jaxrs.models.layers import AttentionMetadata, KVCache, allocate_kv_cache
from jaxrs.ops import Kernels, attention_cost_follows_context
from jaxrs.parallel.shardings import kv_sharding, pin_step_outputs
from jaxrs.structured.mask import all_allowed
from jaxrs.structured.state import token_masks
from jaxrs.vision.prompt import chunk_embeds
from pallas_kernels import qmatmul
from pallas_kernels.shapes import next_power_of_2

log = logging.getLogger("jaxrs")

# Fewest blocks in a block-table width bucket. A dense attention (a short prompt chunk's; any attention
# without `cost_follows_context`) reads every key of the bucket, so short sequences pay for this many,
# while each width below is one more compiled shape per batch bucket. 8 gave
# 32 short streams most of what 4 gives, at one width fewer (bench/RESULTS.md, "CPU decode, third round:
# attention").
MIN_WIDTH = 8

# A call whose table bucket holds fewer keys than this keeps its bucket even where the attention's cost
# follows the context (`width`): such a table is cheap to read whole or at a few widths, while the widest
# table's decode switch holds up to 36 attentions (`read_widths`), seconds of compile time and MiB of code
# a compiled step; the shortest contexts, and the test suite's tiny models, then compile the few-width
# steps (every decode on the widest table took the suite 28 minutes instead of 16: bench/RESULTS.md, "One
# decode width from 512 keys"). From 256 keys a decode reads the widest table at the same widths a
# 16-block table's switch would (2, 4, ..., 16 blocks), and a prompt chunk over 256 keys takes the tiled
# form (`paged_attention.TILED_MIN_KEYS`), whose loops run to the context: that bucket was one more
# compiled shape per rows bucket and chunk that the widest already covers (bench/RESULTS.md, "Greedy and
# sampled in one step").
WIDEST_FROM_KEYS = 256

# On CPU, calls of up to `qmatmul.CPU_GEMV_ROWS` rows take exactly as many rows as they serve (`rows`):
# Qwen2.5-0.5B's 3-row decode step takes 62 ms against the 4-row step's 112-116 (bench/RESULTS.md, "A few-row
# GEMV reading a reshaped row"), at one more decode shape per table width to compile.
EXACT_FEW_ROWS = True

# Prompt chunks up to this many tokens (padded), whose block tables fit the narrowest width, are prefilled
# together, one row each, in a single call, so many short prompts reach their first tokens sooner than one
# call each would bring them (bench/RESULTS.md, "Aggregate throughput at 1, 8 and 32 concurrent
# sequences"). Longer chunks run alone, so the batched prefill shapes stay few.
MAX_BATCHED_CHUNK = 64

# Prompt chunks longer than this pad to a multiple of it, shorter ones to a power of two: a 600-token
# prompt computes 768 positions rather than 1,024 (a prefill costs about its padded length), for four more
# chunk lengths up to 2,048 (768, 1,280, 1,536, 1,792), which the warm-up compiles in its background part.
CHUNK_STEP = 256

# XLA options the steps compile with, by platform (`EngineConfig.xla_options` and `--xla-option` try
# others). On CPU, LLVM may use 512-bit vectors where the CPU has them (XLA's default prefers 256): the
# fused one-row products of a decode step, which dominate it, run on twice the lanes (bench/RESULTS.md,
# "CPU decode, sixth round"); a CPU without AVX-512 keeps its widest vectors. Measured and left out:
# YNNPACK taking each dot alone on XLA:CPU
# (`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) sped up the layer
# projections in isolation but slowed the engine's decode, single-stream and 32 streams alike
# (bench/RESULTS.md, "CPU decode, fourth round: 32 streams").
STEP_XLA_OPTIONS: dict[str, dict[str, str]] = {"cpu": {"xla_cpu_prefer_vector_width": "512"}}


def step_flags(flags: SamplingFlags, *, greedy_apart: bool = False) -> SamplingFlags:
    """Fewer sampler variants, so fewer compiled steps: every batch takes the sampled path with the
    filters (exact with top-k/top-p/min-p off, a little dearer on CPU: bench/RESULTS.md, "Sampler cost
    on CPU"), whose sampler takes the argmax alone when no row samples (`sampling.sample`), so greedy
    and sampled batches share one executable. `greedy_apart`: an all-greedy batch keeps its own (the
    speculative steps, whose arrays are shaped by it)."""
    if greedy_apart and flags.all_greedy:
        return flags
    return dataclasses.replace(flags, all_greedy=False, filters=True)


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return next_power_of_2(n, minimum)


def logits_at(params, cfg, kernels, kv, tokens, meta, index, lora=None, embeds=None):
    """Logits [B, V] at each row's `index` of a forward pass over `tokens`, and the KV cache with them."""
    if lora is not None:  # each row's adapter slot (LoRA)
        params = bind_slots(params, lora)
    model = merge(params, cfg)  # the nnx module over this trace's parameter arrays
    hidden, kv = model(tokens, meta, kv, kernels, embeds)
    picked = hidden[jnp.arange(hidden.shape[0]), index]
    return pin_step_outputs(model.logits(picked, kernels), kv)


def _prefill(params, kv, tokens, meta, last_index, batch, lora=None, embeds=None, *, cfg, kernels, flags):
    """`embeds`: image feature rows (mask, rows) for a chunk reaching an image; a call without them
    compiles (and stays) the text-only step."""
    logits, kv = logits_at(params, cfg, kernels, kv, tokens, meta, last_index, lora, embeds)
    return sample(logits, batch, flags), kv


def one_token_logits(params, cfg, kernels, kv, tok, pos, tables, valid, lora=None):
    """Logits [B, V] of one token per row at positions `pos` (rows not `valid` write nothing), and the KV
    cache with it written: a decode iteration's forward pass."""
    meta = one_token_meta(kv.k.shape[2], pos, tables, valid)
    return logits_at(params, cfg, kernels, kv, tok[:, None], meta, jnp.zeros_like(pos), lora)


def one_token_meta(block_size: int, pos, tables, valid) -> AttentionMetadata:
    """Attention metadata of one token per row at positions `pos` (rows not `valid` write nothing)."""
    slot = tables[jnp.arange(pos.shape[0]), pos // block_size] * block_size + pos % block_size
    return AttentionMetadata(
        pos[:, None], jnp.where(valid, slot, -1)[:, None], tables, jnp.where(valid, pos + 1, 0)
    )


def _decode(
    params,
    kv,
    tokens,
    positions,
    tables,
    valid,
    batch,
    num_steps,
    lora=None,
    *,
    cfg,
    kernels,
    flags,
    max_steps,
):
    """`num_steps` (at most the static `max_steps`) tokens per row, one loop iteration each: a dynamic
    count, so a one-token and a multi-token call share one compiled step. Outputs are
    [max_steps, B, ...]; rows past `num_steps` are zeros."""

    def forward(step_params, kv, tok, pos):
        logits, kv = one_token_logits(step_params, cfg, kernels, kv, tok, pos, tables, valid, lora)
        return logits, kv, ()

    (outs, _), kv = decode_loop(
        forward, params, kv, tokens, positions, batch, num_steps, (), cfg, flags, max_steps
    )
    return outs, kv


def decode_loop(forward, params, kv, tokens, positions, batch, num_steps, extra, cfg, flags, max_steps):
    """The decode step's loop: `forward(params, kv, tok, pos) -> (logits [B, V], kv, extra)` then a sample,
    `num_steps` times, each sample fed back. Returns ([max_steps, B, ...] samples, [max_steps, ...]
    extras shaped like `extra`'s ShapeDtypeStructs) and the KV cache."""
    rows = tokens.shape[0]
    shapes = jax.eval_shape(lambda: sample(jnp.zeros((rows, cfg.vocab_size)), batch, flags))
    outs = jax.tree.map(lambda a: jnp.zeros((max_steps, *a.shape), a.dtype), (shapes, extra))

    def one(state):
        i, carry, outs = state
        # Tie the weights to the step's carry, so XLA cannot hoist work on them out of the step loop:
        # it would dequantize a packed head once into f32 and read that every step, many times slower
        # than the fused one-row GEMV (bench/RESULTS.md, "CPU decode, second round").
        step_params, (kv, tok, pos) = jax.lax.optimization_barrier((params, carry))
        logits, kv, more = forward(step_params, kv, tok, pos)
        out = sample(logits, {**batch, "step": batch["step"] + i}, flags)
        outs = jax.tree.map(lambda buf, x: buf.at[i].set(x), outs, (out, more))
        return i + 1, (kv, out.tokens, pos + 1), outs

    state = (jnp.int32(0), (kv, tokens, positions), outs)
    _, (kv, _, _), outs = jax.lax.while_loop(lambda state: state[0] < num_steps, one, state)
    return outs, kv


def _logits(params, kv, tokens, positions, tables, valid, lora=None, *, cfg, kernels):
    """A decode iteration's forward pass alone: f32 logits [B, V], left on the device for `_sample`."""
    logits, kv = one_token_logits(params, cfg, kernels, kv, tokens, positions, tables, valid, lora)
    return logits.astype(jnp.float32), kv


def _sample(params, kv, logits, batch, *, flags):
    """A decode iteration's sampler alone, on the logits `_logits` left (the KV pool passes through)."""
    return sample(logits, batch, flags), kv


def _score(params, kv, tokens, meta, targets, lora=None, *, cfg, kernels, top=0):
    """Each target's log-probability, and with `top` > 0 the `top` likeliest tokens' (values, ids) and
    the target's rank (1 + how many tokens are likelier)."""
    if lora is not None:  # the row's adapter slot (LoRA)
        params = bind_slots(params, lora)
    model = merge(params, cfg)
    hidden, kv = model(tokens, meta, kv, kernels)
    logprobs = jax.nn.log_softmax(model.logits(hidden, kernels), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    if top:
        rank = 1 + jnp.sum(logprobs > picked[..., None], axis=-1, dtype=jnp.int32)
        return (picked, *jax.lax.top_k(logprobs, top), rank), kv
    return picked, kv


class Steps(NamedTuple):
    """The jitted step functions for one set of XLA compiler options."""

    prefill: Callable
    decode: Callable
    score: Callable
    logits: Callable
    sample: Callable


@functools.cache
def jitted_steps(xla_options: tuple[tuple[str, str], ...] = ()) -> Steps:
    """The steps compiled with `xla_options` (sorted `(name, value)` pairs), one jit cache per set."""
    jit = functools.partial(jax.jit, donate_argnames=("kv",), compiler_options=dict(xla_options) or None)
    return Steps(
        prefill=jit(_prefill, static_argnames=("cfg", "kernels", "flags")),
        decode=jit(_decode, static_argnames=("cfg", "kernels", "flags", "max_steps")),
        score=jit(_score, static_argnames=("cfg", "kernels", "top")),
        logits=jit(_logits, static_argnames=("cfg", "kernels")),
        sample=jit(_sample, static_argnames=("flags",)),
    )


def step_xla_options(
    options: Mapping[str, str] | None = None, platform: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The options the steps compile with: the platform's `STEP_XLA_OPTIONS` updated with `options`,
    where an empty value drops an option (leaving XLA's own default)."""
    merged = STEP_XLA_OPTIONS.get(platform or jax.default_backend(), {}) | dict(options or {})
    return tuple(sorted((str(k), str(v)) for k, v in merged.items() if v not in ("", None)))


def check_xla_options(options: tuple[tuple[str, str], ...]) -> None:
    """Fail now, naming the option, rather than at the first step's compilation."""
    if not options:
        return
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception as e:  # XLA's error text names the option or value it rejects
        raise JaxrsError(f"bad XLA option in {dict(options)}: {str(e).splitlines()[0]}") from None


class ModelRunner:
    """Owns the parameters and the preallocated KV pool; turns sequences into jitted calls."""

    # Called with each step call before it runs: process 0 of several hands it to the others
    # (`jaxrs.parallel.multihost`), which run it through `_run` too.
    on_step: Callable[[StepCall], None] | None = None

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        *,
        num_blocks: int,
        block_size: int,
        kernels: Kernels,
        dtype: jnp.dtype,
        max_num_seqs: int,
        max_chunk: int,
        max_model_len: int,
        max_decode_steps: int = 1,
        xla_options: Mapping[str, str] | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`mesh`: the devices a tensor-parallel model is split over (`params` already placed on it);
        the KV pool is split by heads across it and the steps compile under it."""
        self.cfg = cfg
        self.xla_options = step_xla_options(xla_options)
        check_xla_options(self.xla_options)
        self.steps = jitted_steps(self.xla_options)
        self.params = params
        self.kernels = kernels
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_chunk = max_chunk
        self.max_model_len = max_model_len
        self.max_decode_steps = max_decode_steps
        sharding = None if mesh is None else kv_sharding(mesh)
        self.kv: KVCache = allocate_kv_cache(cfg, num_blocks, block_size, dtype, sharding)
        self.compiled = CompiledSteps(self.steps, params, self.kv, mesh)
        self.device_seconds = 0.0  # wall time inside step calls (dispatch + device + transfer back)
        self.warmed: dict | None = None  # warmup()'s arguments
        self.lora_slot: Callable[[Sequence], int] | None = None  # a sequence's adapter slot (LoRA served)
        self.warming: Warmup | None = None
        self.masked_warming: Warmup | None = None  # the constrained batches' steps (`warm_masked_steps`)
        self.held: jax.Array | None = None  # the last `logits` call's output, for the `sample` call after it
        # A batch with constrained rows fills their masks while its forward runs (`masked_decode`);
        # False: before one fused decode call, as free rows decode (for comparisons).
        self.overlap_masks = True

    def paired(self, cfg: ModelConfig, params: dict) -> ModelRunner:
        """A runner of `cfg`'s model over a KV pool of as many blocks as this one's, in the same dtype,
        indexed by the same block tables: the engine's block manager allocates, frees, preempts and
        prefix-caches both pools at once (a draft model's pool; X-LoRA's scaling pass's)."""
        return ModelRunner(
            cfg,
            params,
            num_blocks=self.kv.k.shape[1],
            block_size=self.block_size,
            kernels=self.kernels,
            dtype=self.kv.k.dtype,
            max_num_seqs=self.max_num_seqs,
            max_chunk=self.max_chunk,
            max_model_len=self.max_model_len,
            xla_options=dict(self.xla_options),
        )

    def release(self) -> None:
        """Free the KV pool now and let go of the parameters, so new weights can take their memory; the
        runner cannot step afterwards."""
        self.stop_warmup()
        for pages in self.kv or ():
            pages.delete()
        self.kv, self.params = None, None  # type: ignore[assignment]

    # -- shapes ---------------------------------------------------------------------------------------
    def width(self, num_blocks: int, decode: bool = False) -> int:
        """Block-table width of a call whose longest row holds `num_blocks` blocks: the power-of-two
        bucket of `num_blocks` (at least MIN_WIDTH); from `WIDEST_FROM_KEYS` keys, the widest table
        (what max_model_len needs, as a power of two) where the attention then costs what the rows'
        contexts need all the same (`ops.attention_cost_follows_context`: a decode that reads only the
        columns its rows need, a prompt chunk in the tiled form), so one compiled shape serves every
        longer context."""
        widest = bucket(-(-self.max_model_len // self.block_size))
        width = min(bucket(num_blocks, MIN_WIDTH), widest)
        keys = width * self.block_size
        if keys < WIDEST_FROM_KEYS or not attention_cost_follows_context(self.kernels, keys, decode=decode):
            return width
        return widest

    def rows(self, n: int) -> int:
        """Batch-rows bucket of a call serving n sequences: a power of two, except that on CPU up to
        `qmatmul.CPU_GEMV_ROWS` rows (one GEMV a row there, so a padding row costs what a real one does)
        are their own bucket: three requests run a 3-row step, not a 4-row one."""
        exact = qmatmul.CPU_GEMV_ROWS if EXACT_FEW_ROWS and jax.default_backend() == "cpu" else 2
        return min(n if n <= exact else bucket(n), bucket(self.max_num_seqs))

    def chunk_len(self, n: int) -> int:
        """Padded length of a prompt chunk of n tokens (see CHUNK_STEP), at most `max_chunk`'s bucket."""
        padded = bucket(n, 16) if n <= CHUNK_STEP else -(-n // CHUNK_STEP) * CHUNK_STEP
        return min(padded, bucket(self.max_chunk))

    def compile_count(self) -> int:
        """Step executables compiled so far (by any thread): grows only when something compiles."""
        return len(self.compiled)

    @property
    def shapes(self) -> set[tuple]:
        """The compiled step shapes: `(kind, *label)`, see `StepCall`."""
        return set(self.compiled.labels)

    def _run(self, call: StepCall, fetch: Callable, compiled: CompiledSteps | None = None) -> Any:
        """Run `call` on the live parameters and KV pool (compiling its shape first if no thread has);
        `fetch` brings the outputs back to the host. `compiled`: another set of steps over them."""
        if self.on_step is not None:
            self.on_step(call)
        run = (self.compiled if compiled is None else compiled).get(call)
        began = time.perf_counter()
        args = [self.held if is_held(a) else a for a in call.args]
        out, self.kv = run(self.params, self.kv, *args)
        self.held = out if call.kind == "logits" else None
        out = fetch(out)
        self.device_seconds += time.perf_counter() - began
        return out

    def _sampling(self, seqs: Seq[Sequence], batch: int, *, masks: bool = True) -> tuple[dict, SamplingFlags]:
        """The sampler's inputs; the token masks all ones unless `masks` (then filled from the grammars)."""
        arrays, flags = build_sampling_batch(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [len(s.output_ids) for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
            batch,
            self.cfg.vocab_size,
        )
        grammars = [s.grammar for s in seqs] if masks else []
        arrays["token_mask"] = token_masks(grammars, batch, self.cfg.vocab_size)
        return arrays, step_flags(flags)

    def _lora_slots(self, seqs: Seq[Sequence], batch: int) -> np.ndarray | None:
        """Each row's adapter slot (-1: none, and padding rows), when adapters are served."""
        if self.lora_slot is None:
            return None
        slots = np.full(batch, -1, np.int32)
        slots[: len(seqs)] = [self.lora_slot(s) for s in seqs]
        return slots

    # -- calls ----------------------------------------------------------------------------------------
    def shares_prefill_calls(self, t: int, w: int) -> bool:
        """Whether prefill chunks padded to t tokens, with tables w blocks wide, run several rows a call."""
        return w == self.width(1) and t <= MAX_BATCHED_CHUNK

    def batches_with_others(self, seq: Sequence, start: int, end: int) -> bool:
        """Whether this chunk may share a prefill call with other sequences' chunks."""
        if seq.images is not None and seq.images.overlaps(start, end):
            return False  # image chunks run alone, so text-only calls never carry feature rows
        return self.shares_prefill_calls(self.chunk_len(end - start), self.width(len(seq.table.blocks)))

    def prefill(self, chunks: Seq[tuple[Sequence, int, int]]) -> SampleOutput:
        """Run tokens [start, end) of each (sequence, start, end), one row each, in one call; row i's
        sample is its sequence's next token if end is its length. Several rows: chunks that
        `batches_with_others`, padded to a batch bucket."""
        rows, b = len(chunks), self.rows(len(chunks))
        t = self.chunk_len(max(end - start for _, start, end in chunks))
        w = self.width(max(len(seq.table.blocks) for seq, _, _ in chunks))
        tokens = np.zeros((b, t), np.int32)
        for i, (seq, start, end) in enumerate(chunks):
            tokens[i, : end - start] = seq.all_ids[start:end]
        meta = self._metadata(
            [(seq.table.blocks, start, end - start, seq.num_tokens) for seq, start, end in chunks], b, t, w
        )
        last = np.zeros(b, np.int32)
        last[:rows] = [end - start - 1 for _, start, end in chunks]
        batch, flags = self._sampling([seq for seq, _, _ in chunks], b)
        embeds = chunk_embeds(chunks, b, t, self.cfg.hidden_size)
        lora = self._lora_slots([seq for seq, _, _ in chunks], b)
        call = self.prefill_call(tokens, meta, last, batch, flags, lora, embeds)
        return self._run(call, lambda out: jax.tree.map(lambda a: np.asarray(a)[:rows], out))

    def decode(self, seqs: list[Sequence], num_steps: int) -> SampleOutput:
        """`num_steps` tokens for each sequence; arrays come back as [num_steps, len(seqs), ...]."""
        b = self.rows(len(seqs))
        w = self.width(max(len(s.table.blocks) for s in seqs), decode=True)
        tokens = np.zeros(b, np.int32)
        positions = np.zeros(b, np.int32)
        tables = np.zeros((b, w), np.int32)
        valid = np.zeros(b, bool)
        for i, s in enumerate(seqs):
            tokens[i], positions[i], valid[i] = s.all_ids[-1], s.num_tokens - 1, True
            tables[i, : len(s.table.blocks)] = s.table.blocks
        lora = self._lora_slots(seqs, b)
        if self.overlap_masks and any(s.grammar is not None for s in seqs):
            if num_steps != 1:
                raise ValueError(f"constrained rows decode one token per call, not {num_steps}")
            return masked_decode(self, seqs, tokens, positions, tables, valid, lora)
        batch, flags = self._sampling(seqs, b)
        call = self.decode_call(tokens, positions, tables, valid, batch, flags, num_steps, lora)
        return self._run(
            call, lambda out: jax.tree.map(lambda a: np.asarray(a)[:num_steps, : len(seqs)], out)
        )

    def score(
        self,
        token_ids: list[int],
        blocks: list[int],
        start: int,
        targets: list[int],
        lora_slot: int = -1,
        top: int = 0,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of `targets[i]` after tokens[: start + i + 1]; tokens [start, end) run now,
        with the adapter in `lora_slot` (-1: none) when adapters are served. With `top` > 0, also the
        `top` likeliest tokens at each position: (logprobs, their values [n, top], their ids, ranks)."""
        n = len(token_ids)
        t, w = self.chunk_len(n), self.width(len(blocks))
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = token_ids
        target = np.zeros((1, t), np.int32)
        target[0, :n] = targets
        meta = self._metadata([(blocks, start, n, None)], 1, t, w)
        lora = None if self.lora_slot is None else np.full(1, lora_slot, np.int32)
        statics, label = (self._statics(top=top), (t, w, top)) if top else (self._statics(), (t, w))
        call = StepCall("score", (tokens, meta, target, lora), statics, label)
        return self._run(call, lambda out: jax.tree.map(lambda a: np.asarray(a)[0, :n], out))

    # -- step signatures ------------------------------------------------------------------------------
    def _statics(self, **more: Hashable) -> dict[str, Hashable]:
        return dict(cfg=self.cfg, kernels=self.kernels, **more)

    def prefill_call(
        self, tokens, meta, last, batch: dict, flags: SamplingFlags, lora=None, embeds=None
    ) -> StepCall:
        """The prefill step over [b, t] tokens with w-block tables; labelled (b, t, w, profile), plus
        "images" when image feature rows ride along (`embeds`)."""
        (b, t), w = tokens.shape, meta.block_tables.shape[1]
        args, label = (tokens, meta, last, batch, lora), (b, t, w, profile(flags))
        if embeds is not None:
            args, label = (*args, embeds), (*label, "images")
        return StepCall("prefill", args, self._statics(flags=flags), label)

    def decode_call(
        self, tokens, positions, tables, valid, batch: dict, flags: SamplingFlags, num_steps: int, lora=None
    ) -> StepCall:
        """The decode step of `num_steps` tokens (one compiled step for any count up to
        `max_decode_steps`) over b rows with w-block tables; labelled (b, w, profile)."""
        if not 1 <= num_steps <= self.max_decode_steps:
            raise ValueError(f"{num_steps} decode steps; this runner runs 1 to {self.max_decode_steps}")
        args = (tokens, positions, tables, valid, batch, np.int32(num_steps), lora)
        statics = self._statics(flags=flags, max_steps=self.max_decode_steps)
        return StepCall("decode", args, statics, (*tables.shape, profile(flags)))

    def _metadata(
        self, rows: Seq[tuple[list[int], int, int, int | None]], b: int, t: int, w: int
    ) -> AttentionMetadata:
        """Rows of (blocks, start, n, rope_len): a sequence's tokens [start, start + n), padded to a
        [b, t] batch; `rope_len`: see AttentionMetadata (None: its context length)."""
        positions = np.zeros((b, t), np.int32)
        slots = np.full((b, t), -1, np.int32)
        tables = np.zeros((b, w), np.int32)
        context = np.zeros(b, np.int32)
        rope = np.zeros(b, np.int32)
        for i, (blocks, start, n, rope_len) in enumerate(rows):
            table = np.asarray(blocks, np.int32)
            pos = np.arange(start, start + n)
            positions[i, :n] = pos
            slots[i, :n] = table[pos // self.block_size] * self.block_size + pos % self.block_size
            tables[i, : len(table)] = table
            context[i] = start + n
            rope[i] = start + n if rope_len is None else rope_len
        return AttentionMetadata(positions, slots, tables, context, rope)

    # -- warm-up --------------------------------------------------------------------------------------
    def profile_batch(
        self, params: SamplingParams, rows: int, *, greedy_apart: bool = False
    ) -> tuple[dict, SamplingFlags]:
        """Sampling arrays and step flags for `rows` placeholder rows sampled with `params`: what warm-up
        (and a benchmark of the bare steps) passes where sequences would be; `greedy_apart` as in
        `step_flags`."""
        zeros = [0] * rows
        arrays, flags = build_sampling_batch(
            [params] * rows, zeros, zeros, [[0]] * rows, [[]] * rows, rows, self.cfg.vocab_size
        )
        arrays["token_mask"] = all_allowed(rows, self.cfg.vocab_size)
        return arrays, step_flags(flags, greedy_apart=greedy_apart)

    def warmup_calls(self, profiles: Seq[SamplingParams]) -> tuple[list[StepCall], int]:
        """Every decode and prefill bucket for each sampling profile that compiles a step of its own
        (`step_profiles`: greedy and sampled share one), likeliest first, and how many of them a server
        compiles before it answers: one row at the narrowest width of its kind (decode, and prefill at the
        chunks short prompts take). The rest follow
        by their distance from those, one width (the next of its kind), doubling of rows or of chunk per
        step, so a growing sequence and a second user both find their shapes early, and the large rare
        ones come last.

        Dummy rows write nothing to the cache. Rarer variants (penalties, logit bias, top logprobs)
        compile on first use, and are logged.
        """
        widths, batches = self.buckets()
        chunks = sorted({self.chunk_len(n) for n in range(1, self.max_chunk + 1)})
        profiles = self.step_profiles(profiles)  # those compiling to one step (`step_flags`) warm once
        decode_widths = self.widths(decode=True)
        work = [(w, b, 0, p) for p in profiles for b in batches for w in decode_widths]
        work += [  # one row at every chunk and width; several rows at the short chunks' narrowest width
            (w, b, t, p)
            for p in profiles
            for t in chunks
            for w in widths
            for b in batches
            if w * self.block_size >= min(t, self.max_model_len)
            and (b == 1 or self.shares_prefill_calls(t, w))
        ]

        def distance(shape: tuple) -> int:  # steps away from one row, narrowest width, short chunk
            w, b, t, _ = shape  # a width by its rank among its kind's widths; rows, chunks by doublings
            return (
                (decode_widths if t == 0 else widths).index(w)
                + b.bit_length()
                + (max(t, MAX_BATCHED_CHUNK) // MAX_BATCHED_CHUNK).bit_length()
                - 2
            )

        # At one distance: decode before prefill, a longer sequence before more rows. Stable: profiles
        # keep their order.
        work.sort(key=lambda shape: (distance(shape), shape[2] > 0, shape[1], shape[0], shape[2]))
        return [self._warmup_call(*shape) for shape in work], sum(distance(shape) == 0 for shape in work)

    def buckets(self) -> tuple[list[int], list[int]]:
        """Every block-table width bucket of a prefill and every batch-rows bucket this runner can meet."""
        return self.widths(), sorted({self.rows(b) for b in range(1, self.max_num_seqs + 1)})

    def widths(self, decode: bool = False) -> list[int]:
        """Every block-table width of a prefill or a decode call (`width`)."""
        most = -(-self.max_model_len // self.block_size)
        return sorted({self.width(n, decode) for n in range(1, most + 1)})

    def step_profiles(self, profiles: Seq[SamplingParams]) -> list[SamplingParams]:
        """One of `profiles` per distinct compiled sampler (see `step_flags`: greedy and sampled share)."""
        return list({self.profile_batch(p, 1)[1]: p for p in profiles}.values())

    def warm_masked_steps(self) -> None:
        """Compile the constrained batches' steps (`masked_decode`) in a background thread, once, if this
        runner was warmed up: an engine calls it on meeting its first grammar, so a server that never
        constrains compiles none of them."""
        if self.warmed is None or self.masked_warming is not None or not self.overlap_masks:
            return
        calls = masked_warmup_calls(self, self.step_profiles(self.warmed["profiles"]))
        self.masked_warming = Warmup(self.compiled, calls, first=0)
        self.masked_warming.run(background=True)

    def _warmup_call(self, w: int, b: int, t: int, params: SamplingParams) -> StepCall:
        """Decode (t = 0) or prefill of t tokens, b padding rows with w-block tables, sampled as `params`."""
        batch, flags = self.profile_batch(params, b)
        zeros = np.zeros(b, np.int32)
        if not t:
            tables, valid = np.zeros((b, w), np.int32), np.zeros(b, bool)
            lora = self._lora_slots([], b)
            return self.decode_call(zeros, zeros, tables, valid, batch, flags, self.max_decode_steps, lora)
        meta = self._metadata([], b, t, w)  # padding rows only: nothing is written
        return self.prefill_call(
            np.zeros((b, t), np.int32), meta, zeros, batch, flags, self._lora_slots([], b)
        )

    def warmup(self, profiles: Seq[SamplingParams], *, background: bool = False) -> Warmup:
        """Compile every decode and prefill bucket for each sampling profile (see `warmup_calls`): all
        of them now, or (`background`) the first ones now and the rest in a background thread while the
        engine serves; a shape needed before the background reaches it compiles on first use."""
        self.stop_warmup()
        self.warmed = dict(profiles=tuple(profiles), background=background)
        calls, first = self.warmup_calls(profiles)
        self.warming = Warmup(self.compiled, calls, first)
        self.warming.run(background=background)
        return self.warming

    def stop_warmup(self) -> None:
        """Stop a background warm-up after the compile in progress (if any)."""
        for warming in (self.warming, self.masked_warming):
            if warming is not None:
                warming.stop()


def profile(flags: SamplingFlags) -> str:
    """A short name for the sampler variant a step compiles, for logs: greedy or sampled, then the
    optional stages (`+filters`, `+penalties`, `+bias`, `+bans`, `+allowed`, `+topN` logprobs)."""
    name = "greedy" if flags.all_greedy else "sampled"
    extras = [("filters", flags.filters), ("penalties", flags.penalties), ("bias", flags.logit_bias)]
    extras += [("bans", flags.bans), ("allowed", flags.allowed)]
    name += "".join(f"+{stage}" for stage, on in extras if on)
    return name + (f"+top{flags.top_logprobs}" if flags.top_logprobs else "")
