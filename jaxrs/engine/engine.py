"""The engine: requests in, tokens out. It owns the scheduler, the block manager, the runner and the
output processor, and is the only one to change them.

`step()` asks the scheduler for a batch, runs it (one decode call for all running sequences, one
prefill call per prompt chunk), then hands the sampled tokens to the output processor (text, stops) and
frees what finished. `requantize()` swaps the weights for another format between steps (runtime ISQ),
rebuilding the parts sized by the weights (`_serve`) as `__init__` builds them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import random
import time
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxrs.engine.batch_invariance import invariant_kernels
from jaxrs.engine.block_manager import BlockManager, BlockTable, salted
from jaxrs.engine.matmul_dtype import gemm_kernels
from jaxrs.engine.options import (
    CPU_KV_CACHE_DTYPE,
    CPU_KV_CACHE_FREE_SHARE,
    CPU_KV_CACHE_MB,
    KV_CACHE_DTYPES,
    LAYER_LOOPS,
    EngineConfig,
)
from jaxrs.engine.output_processor import OutputProcessor
from jaxrs.engine.requantize import Reloader, Requantized, RequantizeError, source_reloader
from jaxrs.engine.runner import ModelRunner
from jaxrs.engine.sampling import SampleOutput, SamplingParams, resolve_token_ids, truncated_prompt
from jaxrs.engine.scheduler import PrefillChunk, Scheduler
from jaxrs.engine.sequence import Sequence, Status, TokenLogprob
from jaxrs.engine.speculative import Speculator, load_draft
from jaxrs.engine.speculative_config import SpeculativeConfig
from jaxrs.engine.stats import EngineSnapshot, MemoryUse
from jaxrs.engine.warmup import Warmup
from jaxrs.engine.xlora_runner import XLoraRunner
from jaxrs.errors import JaxrsError
from jaxrs.host_memory import available_bytes, peak_resident_bytes, release_freed, resident_bytes
from jaxrs.loading import LoadedModel
from jaxrs.lora.slots import LoraSlots
from jaxrs.lora.xlora_serving import XLoraServing
from jaxrs.models.decoder import stack_layers, unstack_layers
from jaxrs.ops import Kernels
from jaxrs.parallel.mesh import tensor_mesh
from jaxrs.parallel.shardings import shard_params
from jaxrs.paths import enable_compilation_cache
from jaxrs.quant import parse_format
from jaxrs.quant.tensor import tree_nbytes
from jaxrs.structured.compiler import GrammarCompiler
from jaxrs.structured.state import GrammarState
from jaxrs.vision.loading import require_vision
from jaxrs.vision.prompt import ImagePrompt, encode_chunks

log = logging.getLogger("jaxrs")


@dataclasses.dataclass
class Request:
    """One request's n sequences (`n` > 1 forks after the prompt is computed, sharing its blocks)."""

    request_id: str
    seqs: list[Sequence]
    n: int

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.n and all(s.finished for s in self.seqs)


def kv_bytes_per_token(cfg, dtype: jnp.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def kv_cache_dtype(name: str | None, compute: jnp.dtype) -> jnp.dtype:
    """The KV cache's element type: `name` (one of KV_CACHE_DTYPES), else `CPU_KV_CACHE_DTYPE` on CPU and
    the compute dtype on accelerators."""
    if name is None:
        return jnp.dtype(CPU_KV_CACHE_DTYPE) if jax.default_backend() == "cpu" else compute
    if str(name) not in KV_CACHE_DTYPES:
        raise JaxrsError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return jnp.dtype(name)


def kv_pool_bytes(config: EngineConfig, per_token: int) -> int:
    if config.kv_cache_tokens:
        return config.kv_cache_tokens * per_token
    if config.kv_cache_mb:
        return int(config.kv_cache_mb * 2**20)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return int(free * (config.kv_cache_fraction or 0.9))
    # A device that reports no memory (CPU) takes host memory: a share of what the system has free now.
    free = available_bytes()
    if config.kv_cache_fraction:
        if free is None:
            raise JaxrsError("kv_cache_fraction needs a system that reports free memory; give kv_cache_mb")
        return int(free * config.kv_cache_fraction)
    default = CPU_KV_CACHE_MB * 2**20
    return default if free is None else min(default, int(free * CPU_KV_CACHE_FREE_SHARE))


def derive_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request (index 0 keeps the request's seed)."""
    return seed if index == 0 else hash((seed, index)) & 0xFFFFFFFF


class Engine:
    """Requests in, tokens out. Readers outside the engine use its public surface: `add_request`,
    `step`, `abort`, `validate`, `score`, `requantize`, `warmup`, `stats()`, and the model facts
    `max_model_len`, `vocab_size`, `tokenizer`, `source`, `model_name`, `kv_bytes_per_token`."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        *,
        kernels: Kernels = Kernels(),
        dtype: jnp.dtype = jnp.float32,
        reload: Reloader | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`reload` reads the weights again quantized to a format (for `requantize`); by default from
        `loaded.source`, with that source's own tokenizer. `loaded.params`' layers are stacked or split
        in place for `config.layer_loop`. `mesh`: the devices the model is split over (default: the
        first `tensor_parallel_size` devices when that is over 1, else one device)."""
        cache = enable_compilation_cache()
        if cache:
            log.info("persistent compilation cache: %s", cache)
        if config.batch_invariant:  # one form of each product and of attention whatever the rows
            kernels = invariant_kernels(config, kernels, loaded.config)
        kernels = gemm_kernels(config.gemm_dtype, kernels, jax.default_backend())
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.kernels = kernels
        self.dtype = jnp.dtype(dtype)
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self._reload = reload or source_reloader(loaded.source, self.dtype)
        cfg = loaded.config
        self.prefix_caching = config.prefix_caching
        if self.prefix_caching and cfg.rope_by_length:
            # LongRoPE (dynamic NTK) rotates keys by a factor set (a base) chosen from the sequence's
            # length when they are written; a cached block does not record which, so reusing it could mix.
            kind = (cfg.rope_scaling if cfg.rope_scaling.by_length else cfg.rope_local_scaling).kind
            log.warning("prefix caching is off for this %s RoPE model", kind)
            self.prefix_caching = False
        self._eos = set(self.tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        if mesh is None and config.tensor_parallel_size > 1:
            mesh = tensor_mesh(config.tensor_parallel_size)
        self.mesh = mesh
        self.xlora = XLoraServing(config.xlora, cfg) if config.xlora else None
        lora = self.xlora.lora_config(config.lora) if self.xlora else config.lora
        self.loras = LoraSlots(lora, cfg, self.dtype) if lora else None
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self.speculative = SpeculativeConfig.parse(config.speculative_config)
        if self.speculative and self.xlora:
            raise JaxrsError("speculative decoding is not served beside X-LoRA")
        self._draft = load_draft(self.speculative, loaded, self.dtype) if self.speculative else None
        self._serve(loaded)

    # -- the model served ---------------------------------------------------------------------------
    def _serve(self, model: LoadedModel, warmed: dict | None = None) -> None:
        """Serve `model`'s weights: arrange their layers, size the KV pool from the memory left beside
        them, and build what that pool sizes: the block manager, the runner, the scheduler and the output
        processor. `__init__` and `requantize` (its failure path too) build through here. The scheduler
        takes over the queue of the one before, if any (after `release_all`), and the block manager its
        counters; `warmed` (the old runner's `warmup` arguments) warms the new runner up the same way."""
        previous = getattr(self, "scheduler", None)  # None when called from __init__
        self.model = model
        if self.loras is not None:
            self.loras.attach(model.params)
            if self.xlora is not None:
                self.xlora.bind(self.loras)
        self._arrange_layers()
        cfg, config = model.config, self.config
        step_cfg = cfg if self.mesh is None else shard_params(cfg, model.params, self.mesh)
        per_token = self.kv_bytes_per_token  # the draft's pool has as many blocks: its bytes count too
        per_token += kv_bytes_per_token(self._draft.config, self.kv_dtype) if self._draft else 0
        per_token += self.kv_bytes_per_token if self.xlora else 0  # the scaling pass's pool
        num_blocks = max(1, kv_pool_bytes(config, per_token) // (per_token * config.block_size))
        max_model_len = min(
            config.max_model_len or cfg.max_position_embeddings, num_blocks * config.block_size
        )
        self.blocks = BlockManager(
            num_blocks,
            config.block_size,
            prefix_caching=self.prefix_caching,
            stats=previous.blocks.stats if previous is not None else None,
        )
        runner = ModelRunner if self.xlora is None else functools.partial(XLoraRunner, xlora=self.xlora)
        self.runner = runner(
            step_cfg,
            model.params,
            num_blocks=num_blocks,
            block_size=config.block_size,
            kernels=self.kernels,
            dtype=self.kv_dtype,
            max_num_seqs=config.max_num_seqs,
            max_chunk=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            max_decode_steps=config.max_decode_steps,
            xla_options=config.xla_options,
            mesh=self.mesh,
        )
        if self.loras is not None:
            self.runner.lora_slot = lambda seq: self.loras.slot_of(seq.params.lora)
        self.speculator = Speculator(self.speculative, self.runner, self._draft) if self.speculative else None
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token, %s); max model length %d",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            num_blocks * config.block_size * per_token / 2**20,
            per_token,
            self.kv_dtype.name,
            max_model_len,
        )
        release_freed()  # what loading freed, so the figures below (and the process's) leave it out
        self._ready_resident = resident_bytes()
        if warmed:
            self.runner.warmup(**warmed)
            if self._grammars is not None:  # grammars were met: their steps too
                self.runner.warm_masked_steps()
        log.info("%s", self.memory().summary())
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_decode_steps=config.max_decode_steps,
            max_model_len=max_model_len,
        )
        if previous is not None:
            self.scheduler.take_over(previous)
        self.output = OutputProcessor(self.tokenizer, self._eos, max_model_len)
        self.max_model_len = max_model_len

    def _arrange_layers(self) -> None:
        """Stack or split the model's layer weights, in place, for the configured layer loop."""
        loop = self.config.layer_loop
        if loop not in LAYER_LOOPS:
            raise JaxrsError(f"layer_loop must be one of {', '.join(LAYER_LOOPS)}, not {loop!r}")
        (unstack_layers if loop == "unrolled" else stack_layers)(self.model.params)
        log.info("layers: %s (%d)", loop, self.model.config.num_layers)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def source(self) -> str:
        """Where the weights were loaded from (a local path)."""
        return self.model.source

    @property
    def model_name(self) -> str:
        """The model's file or folder name."""
        return Path(self.model.source).name

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes (every layer's keys and values)."""
        return kv_bytes_per_token(self.model.config, self.kv_dtype)

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles requests' grammars against this model's vocabulary (built on first use: ~1 s)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self._eos)
            self.runner.warm_masked_steps()  # constrained batches' steps, now that one may come
        return self._grammars

    def stats(self) -> EngineSnapshot:
        """The engine's gauges and counters now (safe to call from another thread: it only reads)."""
        blocks, scheduler, runner, spec = self.blocks, self.scheduler, self.runner, self.speculator
        return EngineSnapshot(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks,
            block_size=blocks.block_size,
            prefix_cache_lookups=blocks.stats.queries,
            prefix_cache_hits=blocks.stats.hits,
            prefix_cache_evictions=blocks.stats.evictions,
            num_preemptions=scheduler.num_preemptions,
            compiled_shapes=runner.compile_count() + (spec.compile_count() if spec else 0),
            pending_shapes=runner.warming.pending if runner.warming else 0,
            device_seconds=runner.device_seconds,
            spec_decode=dataclasses.replace(
                spec.stats, accepted_per_position=list(spec.stats.accepted_per_position)
            )
            if spec
            else None,
        )

    def memory(self) -> MemoryUse:
        """Where the memory goes now: weights, KV pool, compiled steps, the rest (see `MemoryUse`). Hands
        the heap's free pages back first, so a compile's spent working memory does not count as code."""
        release_freed()
        weights, kv = tree_nbytes(self.model.params), tree_nbytes(self.runner.kv)
        ready, now = self._ready_resident, resident_bytes()
        on_host = weights + kv if jax.default_backend() == "cpu" else 0
        return MemoryUse(
            weights=weights,
            kv_pool=kv,
            compiled=None if ready is None or now is None else max(0, now - ready),
            rest=None if ready is None else max(0, ready - on_host),
            resident=now,
            peak_resident=peak_resident_bytes(),
        )

    def warmup(self, profiles: Seq[SamplingParams], *, background: bool = False) -> Warmup:
        """Compile every step shape (every decode and prefill bucket) for each sampling profile, so
        serving never waits on a compile for them; with `background`, only the likeliest few now and the
        rest in a background thread while the engine steps (see `ModelRunner.warmup`)."""
        warm = self.runner.warmup(profiles, background=background)
        if self.model.vision is not None:
            log.info("vision tower: %d shapes compiled", self.model.vision.warmup())
        if self.speculator is not None:  # its shapes, now (K is fixed for the engine)
            log.info("speculative decoding: %d step shapes warmed up", self.speculator.warmup(profiles))
        release_freed()  # the compilers' working memory
        log.info("%s", self.memory().summary())
        return warm

    def stop_warmup(self) -> None:
        """Stop a background warm-up (after the compile in progress): the engine is shutting down."""
        self.runner.stop_warmup()

    # -- requests -----------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_key: Hashable = None,
        images: ImagePrompt | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Queue a request; raises JaxrsError (and queues nothing) if it cannot be served. `images`: the
        prompt's images (`jaxrs.vision.prompt.place_images`), which key its prefix-cache blocks.
        `cache_salt` (vLLM's): only requests with the same salt share prefix-cache blocks."""
        prompt_ids = truncated_prompt(prompt_ids, params.truncate_prompt_tokens, self.max_model_len)
        self.validate(prompt_ids, params)
        if images is not None:
            require_vision(self.model.vision, self.source)
            cache_key = images.cache_key(cache_key)

        cache_key = salted(self._adapter_key(params.lora, cache_key), cache_salt)
        params = params.with_defaults(self.model.generation_config)
        params = resolve_token_ids(params, self.tokenizer, self._eos)
        request_id = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        first = self._new_sequence(request_id, 0, prompt_ids, params, seed, cache_key, images)
        request = Request(request_id, [first], params.n)
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        return request

    def _adapter_key(self, lora: str | None, cache_key: Hashable = None) -> Hashable:
        """The prefix-cache key of a request running with adapter `lora` (an error naming it when it
        is not served)."""
        if lora is None:
            return cache_key
        if self.xlora is not None and lora == self.xlora.name:
            return self.xlora.cache_key(cache_key)
        if self.loras is None:
            raise JaxrsError(f"no LoRA adapters are served (the request asks for {lora!r})")
        return self.loras.cache_key(lora, cache_key)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise JaxrsError("the prompt is empty")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise JaxrsError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise JaxrsError(
                f"the prompt has {len(prompt_ids)} tokens; this engine serves at most "
                f"{self.max_model_len} tokens per sequence"
            )
        if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
            raise JaxrsError(f"logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise JaxrsError(f"stop_token_ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.allowed_token_ids or []):
            raise JaxrsError(f"allowed_token_ids must be in [0, {vocab})")
        if params.grammar is not None:
            self.grammars.compile(params.grammar)  # GrammarError (a JaxrsError) names what is wrong

    def _new_sequence(self, request_id, index, prompt_ids, params, seed, cache_key, images=None) -> Sequence:
        detok = self.output.detokenizer(prompt_ids, params)
        seq = Sequence(
            request_id, index, list(prompt_ids), params, derive_seed(seed, index), detok, cache_key, images
        )
        if params.grammar is not None:
            seq.grammar = GrammarState(self.grammars, params.grammar)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.finished:
                self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one scheduled batch; returns the sequences that received tokens or finished."""
        plan = self.scheduler.schedule()
        touched: list[Sequence] = []
        speculate, plain = self._speculating(plan.decode)
        if plain:
            out = self.runner.decode(plain, plan.decode_steps)
            self._append_decoded(plain, out, [plan.decode_steps] * len(plain))
        if speculate:
            out, accepted = self.speculator.step(speculate)
            for seq, kept in zip(speculate, accepted.tolist(), strict=True):
                self.speculator.settle(seq, kept)
            self._append_decoded(speculate, out, (accepted + 1).tolist())
        touched += plan.decode
        encode_chunks(plan.prefill, self.model.vision)  # image features, once per request
        for group in self._prefill_calls(plan.prefill):
            out = self.runner.prefill([(c.seq, c.start, c.end) for c in group])
            if self.speculator is not None:
                self.speculator.prefill([(c.seq, c.start, c.end) for c in group])
            for row, chunk in enumerate(group):
                seq = chunk.seq
                seq.num_computed = chunk.end
                self.blocks.register_full_blocks(seq.table, seq.all_ids, seq.num_computed, seq.cache_key)
                if chunk.completes_prompt:
                    self._fork_samples(seq)  # before the first token, which may finish (and free) the parent
                    self._append(seq, out, (row,))
                    touched.append(seq)
        for seq in plan.decode:
            if not seq.finished:
                self.blocks.register_full_blocks(seq.table, seq.all_ids, seq.num_computed, seq.cache_key)
        return touched

    def _speculating(self, decode: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """The decode sequences that speculate this step (holding blocks for K more tokens), and the rest."""
        if self.speculator is None:
            return [], decode
        spec, plain = [], []
        for seq in decode:
            ok = self.speculator.wants(seq, self.max_model_len)
            ok = ok and self.blocks.grow(seq.table, seq.num_tokens + self.speculator.k)
            (spec if ok else plain).append(seq)
        return spec, plain

    def _append_decoded(self, seqs: list[Sequence], out: SampleOutput, counts: list[int]) -> None:
        """Hand row i's first `counts[i]` decoded tokens ([step, row] in `out`) to the output processor."""
        for i, (seq, count) in enumerate(zip(seqs, counts, strict=True)):
            for s in range(count):
                if seq.finished:
                    break
                seq.num_computed = seq.num_tokens
                self._append(seq, out, (s, i))

    def _prefill_calls(self, chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
        """The step's prefill chunks as calls: short ones that may share a call grouped by padded length
        (at most `max_num_seqs` rows a call), the rest alone."""
        shared: dict[int, list[PrefillChunk]] = {}
        calls = []
        for c in chunks:
            if self.runner.batches_with_others(c.seq, c.start, c.end):
                shared.setdefault(self.runner.chunk_len(c.end - c.start), []).append(c)
            else:
                calls.append([c])
        most = self.config.max_num_seqs
        for group in shared.values():
            calls += [group[i : i + most] for i in range(0, len(group), most)]
        return calls

    def _fork_samples(self, seq: Sequence) -> None:
        """After the first sample's prompt is computed, start the others on its blocks."""
        request = self.requests.get(seq.request_id)
        if request is None or seq.index != 0 or len(request.seqs) == request.n:
            return
        prompt_len = len(seq.prompt_ids)
        for index in range(1, request.n):
            child = self._new_sequence(
                seq.request_id, index, seq.prompt_ids, seq.params, seq.seed, seq.cache_key, seq.images
            )
            child.table = self.blocks.fork(seq.table, prompt_len)
            child.num_computed = len(child.table.blocks) * self.blocks.block_size
            child.num_cached_tokens = child.num_computed
            request.seqs.append(child)
            self.scheduler.add(child, front=True)

    # -- scoring ------------------------------------------------------------------------------------
    def score(
        self, prompt_ids: list[int], continuation_ids: list[int], lora: str | None = None
    ) -> list[float]:
        """Log-probabilities of the continuation tokens after the prompt (prefix cache applies), under
        the LoRA adapter `lora` (None: the base model)."""
        return [lp.logprob for lp in self._scored(prompt_ids, continuation_ids, lora, 0)]

    def prompt_logprobs(
        self, prompt_ids: list[int], top: int = 0, lora: str | None = None
    ) -> list[TokenLogprob]:
        """Each prompt token's log-probability after the tokens before it (the first has none: the
        list starts at the second) and the `top` likeliest tokens there (the legacy completions'
        `echo` with `logprobs`)."""
        return self._scored(prompt_ids[:1], prompt_ids[1:], lora, top)

    def _scored(
        self, prompt_ids: list[int], continuation_ids: list[int], lora: str | None, top: int
    ) -> list[TokenLogprob]:
        if not continuation_ids:
            return []
        ids = list(prompt_ids) + list(continuation_ids)
        self.validate(ids[:-1] or ids, SamplingParams())
        if self.xlora is not None and lora == self.xlora.name:
            raise JaxrsError("scoring runs the base model or a plain LoRA adapter, not X-LoRA")
        key = self._adapter_key(lora)
        slot = -1 if lora is None else self.loras.slot_of(lora)
        table = BlockTable()
        try:
            done = self.blocks.match_prefix(table, prompt_ids, key)
            if not self.blocks.grow(table, len(ids) - 1):
                raise JaxrsError(f"the KV cache has too few free blocks to score {len(ids)} tokens now")
            out: list[TokenLogprob] = []
            while done < len(ids) - 1:
                end = min(done + self.config.max_num_batched_tokens, len(ids) - 1)
                targets = ids[done + 1 : end + 1]
                found = self.runner.score(ids[done:end], table.blocks, done, targets, slot, top)
                if top:
                    picked, values, top_ids, ranks = found
                    out += [
                        TokenLogprob(t, float(lp), tuple(zip(i.tolist(), v.tolist(), strict=True)), int(r))
                        for t, lp, v, i, r in zip(targets, picked, values, top_ids, ranks, strict=True)
                    ]
                else:
                    out += [TokenLogprob(t, float(lp)) for t, lp in zip(targets, found, strict=True)]
                done = end
                self.blocks.register_full_blocks(table, ids, done, key)
            skipped = len(ids) - 1 - len(out)  # prompt positions served from the cache
            return out[len(prompt_ids) - 1 - skipped :]
        finally:
            self.blocks.free(table)

    # -- re-quantization ----------------------------------------------------------------------------
    def requantize(self, fmt: str) -> Requantized:
        """Replace the weights, between steps, by the model's weights quantized to `fmt` (runtime ISQ).

        Requests stay queued: running sequences give their blocks back and recompute their tokens with
        the new weights, and the prefix cache is emptied (its K/V came from the old ones). The KV pool
        is sized again from the memory now free, and a warmed-up runner is warmed up again. An unknown
        format raises `JaxrsError` before anything changes; a failed load puts the old weights back
        and raises `RequantizeError`.
        """
        fmt = parse_format(fmt)
        began = time.perf_counter()
        weight_bytes, kv_blocks = tree_nbytes(self.model.params), self.blocks.num_blocks
        requeued = self.scheduler.release_all()
        warmed = self.runner.warmed
        self.runner.release()
        if self.speculator is not None:
            self.speculator.release()
        stash = jax.device_get(self.model.params)  # on the host, to put back if loading fails
        shell = self.model = dataclasses.replace(self.model, params={})  # config stays readable meanwhile
        failure = None
        try:
            self._serve(self._load(fmt), warmed)
        except Exception as error:  # any failure puts the old weights back
            log.exception("re-ISQ to %s failed; putting the old weights back", fmt)
            failure = f"{type(error).__name__}: {error}"
        if failure is not None:  # past the except block, so its traceback no longer pins new arrays
            self.runner.release()  # a new runner, if it was built
            if self.speculator is not None:
                self.speculator.release()
            self._serve(dataclasses.replace(shell, params=jax.device_put(stash)), warmed)
            raise RequantizeError(f"re-ISQ to {fmt} failed; the model is unchanged ({failure})")
        cut = [seq for seq in self.scheduler.waiting if seq.num_tokens >= self.max_model_len]
        for seq in cut:  # a smaller pool no longer holds them
            self._finish_at_length(seq)
        done = Requantized(
            fmt,
            weight_bytes,
            tree_nbytes(self.model.params),
            kv_blocks,
            self.blocks.num_blocks,
            self.max_model_len,
            requeued,
            time.perf_counter() - began,
            cut,
        )
        log.info(
            "re-ISQ to %s in %.1f s: weights %.1f -> %.1f MiB, KV pool %d -> %d blocks, %d running "
            "sequences recompute, %d cut at the new max model length; step shapes compile again%s",
            fmt,
            done.seconds,
            done.weight_bytes_before / 2**20,
            done.weight_bytes_after / 2**20,
            done.kv_blocks_before,
            done.kv_blocks_after,
            requeued,
            len(cut),
            " (warmed up)" if warmed else " on first use",
        )
        return done

    def _load(self, fmt: str) -> LoadedModel:
        """The model's weights read again in `fmt`, beside the config, tokenizer and defaults in use."""
        fresh = self._reload(fmt)
        if fresh.config != self.model.config:
            raise JaxrsError(f"{self.model.source} no longer holds the model that was loaded from it")
        return dataclasses.replace(self.model, params=fresh.params)

    # -- tokens and stops ---------------------------------------------------------------------------
    def _append(self, seq: Sequence, out: SampleOutput, at: tuple) -> None:
        if seq.grammar is not None:
            seq.grammar.advance(int(out.tokens[at]))
        reason = self.output.append(seq, out, at)
        if reason is not None:
            self._finish(seq, reason)

    def _finish_at_length(self, seq: Sequence) -> None:
        self.output.flush(seq)
        self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.grammar = None  # frees the matcher
        if self.speculator is not None:
            self.speculator.finished(seq)  # its acceptance, logged
        self.scheduler.remove(seq)
        request = self.requests.get(seq.request_id)
        if request is not None and request.finished:
            del self.requests[seq.request_id]
