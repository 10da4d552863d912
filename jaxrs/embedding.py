"""Sentence embeddings: inputs -> token ids -> length-bucketed batches -> one jitted step per batch
(the model's last hidden states, pooled, optionally normalized) -> vectors in input order.

Two kinds of model embed: BERT-family encoders (`models.bert`) and the decoder families
(`models.decoder`), whose final normed hidden states are pooled (last token or mean) instead of turned
into logits. A decoder runs its usual paged attention over a scratch KV cache that lives only inside
the step; one whose config asks for bidirectional attention (EmbeddingGemma's
`use_bidirectional_attention`) gets the same attention op with its causal mask lifted (see
`bidirectional_kernels`).

Inputs are sorted by length and cut into batches of at most `MAX_BATCH_ROWS` rows and
`MAX_BATCH_TOKENS` padded tokens; rows pad to powers of two, lengths to `length_bucket`, so few shapes
compile. Padding never changes a vector: pooling and attention read only a row's own tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs import ops
from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.loading.sentence_transformers import EmbeddingSpec, is_embedding_folder, load_dense
from jaxrs.models import bert, decoder
from jaxrs.models.layers import AttentionMetadata, allocate_kv_cache
from jaxrs.models.nn import value
from jaxrs.models.pooling import l2_normalize, pool
from jaxrs.ops import Kernels
from jaxrs.tokenizer import Tokenizer
from pallas_kernels.shapes import next_power_of_2

log = logging.getLogger("jaxrs")

MAX_INPUTS = 2048  # inputs per request, as OpenAI's limit
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 8192  # padded tokens per jitted call
MIN_LENGTH = 16  # shortest padded length (and the largest block size of a decoder's scratch KV cache)

Input = str | Sequence[int]


class EmbeddingInputError(JaxrsError):
    """An input the model cannot embed (empty, too long, ids outside the vocabulary, a bad option)."""

    def __init__(self, message: str, param: str = "input"):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class Embeddings:
    vectors: np.ndarray  # [inputs, dimensions] float32
    num_tokens: list[int]  # tokens each input took (after truncation)


def length_bucket(n: int) -> int:
    """Padded length for `n` tokens: 16, 24, 32, 48, 64, 96, 128, 192... (powers of two and the
    midpoints between them), so a batch pads at most a third of its longest input."""
    bucket = MIN_LENGTH
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return bucket


def bidirectional_kernels(kernels: Kernels) -> Kernels:
    """`kernels` with the paged attention op's causal mask lifted: every query sees every key of its
    row, or with a sliding window those less than `window` positions away on either side (transformers'
    bidirectional window). Done through the op's own contract: a query's mask position is moved to the
    end of its row (or `window - 1` ahead, with a window of `2 * window - 1`), the RoPE positions stay."""
    inner_name = dict(kernels.choice).get("paged_attention") or ops.default_name("paged_attention")
    name = f"bidirectional+{inner_name}"
    if name not in ops.implementations("paged_attention"):
        inner = ops.resolve("paged_attention", inner_name)

        def attention(q, k_cache, v_cache, layer, block_tables, positions, context_lens, *, scale, **kw):
            window = kw.pop("sliding_window", None)
            if window is None:
                ends = jnp.broadcast_to((context_lens - 1)[:, None], positions.shape)
                return inner(q, k_cache, v_cache, layer, block_tables, ends, context_lens, scale=scale, **kw)
            ahead = positions + window - 1
            return inner(
                q, k_cache, v_cache, layer, block_tables, ahead, context_lens,
                scale=scale, sliding_window=2 * window - 1, **kw,
            )  # fmt: skip

        ops.register("paged_attention", name)(attention)
    return Kernels(tuple(sorted({**dict(kernels.choice), "paged_attention": name}.items())))


def _decoder_states(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig, kernels: Kernels):
    """Final normed hidden states of a decoder over right-padded rows, through a scratch paged cache
    (row b's token t in slot b * T + t)."""
    batch, length = tokens.shape
    block = math.gcd(length, MIN_LENGTH)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    slots = jnp.where(positions < lengths[:, None], jnp.arange(batch)[:, None] * length + positions, -1)
    tables = jnp.arange(batch * length // block, dtype=jnp.int32).reshape(batch, -1)
    model = decoder.merge(params, cfg)
    kv = allocate_kv_cache(cfg, batch * length // block, block, value(model.final_norm.weight).dtype)
    hidden, _ = model(tokens, AttentionMetadata(positions, slots, tables, lengths), kv, kernels)
    return hidden


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch.nn.GELU's default
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
}


@functools.partial(jax.jit, static_argnames=("cfg", "kernels", "pooling", "activations", "normalize"))
def _embed_step(params, dense, tokens, lengths, *, cfg, kernels, pooling, activations, normalize):
    if isinstance(cfg, bert.EncoderConfig):
        hidden = bert.merge(params, cfg)(tokens, lengths, kernels)
    else:
        hidden = _decoder_states(params, tokens, lengths, cfg, kernels)
    vectors = pool(hidden, lengths, pooling).astype(jnp.float32)
    for layer, activation in zip(dense, activations, strict=True):  # sentence-transformers' Dense modules
        vectors = vectors @ layer["weight"].T
        vectors = ACTIVATIONS[activation](vectors + layer["bias"] if "bias" in layer else vectors)
    return l2_normalize(vectors) if normalize else vectors


class _Job:
    """One `embed_ids` call waiting for (or holding) its vectors."""

    def __init__(self, ids: list[list[int]]):
        self.ids, self.done = ids, threading.Event()
        self.vectors: np.ndarray | None = None
        self.error: Exception | None = None

    def result(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.vectors


class Embedder:
    """Embeds texts or token-id lists with one model; safe to call from several threads (one thread runs
    the batches, merging the calls that arrive meanwhile). `params` is read at every round, so a decoder
    shared with a generation engine embeds with the weights it serves now (after a re-quantization too)."""

    def __init__(
        self,
        cfg: bert.EncoderConfig | ModelConfig,
        params: Callable[[], dict],
        tokenizer: Tokenizer,
        spec: EmbeddingSpec,
        *,
        source: str,
        kernels: Kernels = Kernels(),
        bidirectional: bool = False,
    ):
        if bidirectional and isinstance(cfg, ModelConfig) and cfg.sliding_window:
            # transformers' Gemma 3 halves a bidirectional model's window (`sliding_window // 2 + 1`,
            # exclusive on each side)
            cfg = dataclasses.replace(cfg, sliding_window=cfg.sliding_window // 2 + 1)
        self.cfg, self.params, self.tokenizer, self.spec, self.source = cfg, params, tokenizer, spec, source
        self.kernels = bidirectional_kernels(kernels) if bidirectional else kernels
        positions = cfg.max_tokens if isinstance(cfg, bert.EncoderConfig) else cfg.max_position_embeddings
        self.max_tokens = min(spec.max_tokens or positions, positions)
        self.dimensions = cfg.hidden_size * len(spec.pooling)
        if spec.dense:
            if spec.dense[0].in_features != self.dimensions:
                raise JaxrsError(
                    f"{spec.dense[0].folder}: a Dense module taking {spec.dense[0].in_features} features "
                    f"after pooling that gives {self.dimensions}"
                )
            self.dimensions = spec.dense[-1].out_features
        self._dense = tuple(load_dense(layer, jnp.float32) for layer in spec.dense)
        self._queue: list[_Job] = []
        self._queue_changed = threading.Condition()
        self._running = False  # a thread is running batches
        self._shapes: set[tuple[int, int]] = set()

    # -- inputs ---------------------------------------------------------------------------------------

    def token_ids(self, inputs: Sequence[Input], truncate: int | None = None) -> list[list[int]]:
        """Token ids of each input, checked: text gets the model's special tokens (its tokenizer's
        post-processor, as sentence-transformers tokenizes), ids are taken as they are. `truncate`
        keeps the first that many tokens (special tokens kept); without it a longer input is an error."""
        if not inputs:
            raise EmbeddingInputError("input must not be empty")
        if len(inputs) > MAX_INPUTS:
            raise EmbeddingInputError(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
        if truncate == -1:
            truncate = self.max_tokens
        if truncate is not None and not 1 <= truncate <= self.max_tokens:
            raise EmbeddingInputError(
                f"truncate_prompt_tokens must be -1 or in [1, {self.max_tokens}], not {truncate}",
                "truncate_prompt_tokens",
            )
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        encoded = dict(zip(texts, self._encode([inputs[i] for i in texts], truncate), strict=True))
        out = []
        vocab = self.cfg.vocab_size
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                if not x:
                    raise EmbeddingInputError(f"input[{i}] is an empty string")
                ids = encoded[i]
            else:
                ids = [int(t) for t in x]
                if not ids:
                    raise EmbeddingInputError(f"input[{i}] is an empty list of token ids")
                if not all(0 <= t < vocab for t in ids):
                    raise EmbeddingInputError(f"input[{i}]: token ids must be in [0, {vocab})")
                ids = ids[:truncate] if truncate else ids
            if len(ids) > self.max_tokens:
                raise EmbeddingInputError(
                    f"input[{i}] has {len(ids)} tokens, more than the {self.max_tokens} this model embeds; "
                    "shorten it or set truncate_prompt_tokens"
                )
            out.append(ids)
        return out

    def _encode(self, texts: list[str], truncate: int | None) -> list[list[int]]:
        backend = self.tokenizer.backend
        if backend.post_processor is None:  # (a GGUF's tokenizer) its BOS/EOS flags add special tokens
            return [self.tokenizer.encode(t)[:truncate] for t in texts]
        if truncate is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
        keep = max(truncate - backend.num_special_tokens_to_add(False), 1)
        encodings = [backend.encode(t, add_special_tokens=False) for t in texts]
        for e in encodings:
            e.truncate(keep)
        return [backend.post_process(e).ids[:truncate] for e in encodings]

    def check_dimensions(self, dimensions: int | None) -> int:
        """The output size a request's `dimensions` asks for (Matryoshka models only)."""
        full = self.dimensions
        if dimensions is None or dimensions == full:
            return full
        if self.spec.matryoshka_dims is None:
            raise EmbeddingInputError(
                f"this model does not support dimensions other than {full} (it declares no Matryoshka "
                "dimensions)",
                "dimensions",
            )
        allowed = self.spec.matryoshka_dims
        if not 1 <= dimensions <= full or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {full}"
            raise EmbeddingInputError(f"dimensions must be one of {sizes}, not {dimensions}", "dimensions")
        return dimensions

    # -- running --------------------------------------------------------------------------------------

    def embed(
        self,
        inputs: Sequence[Input],
        *,
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Embeddings:
        size = self.check_dimensions(dimensions)
        ids = self.token_ids(inputs, truncate_prompt_tokens)
        vectors = self.embed_ids(ids)
        if size != vectors.shape[1]:  # Matryoshka: the leading dimensions, made unit length again
            vectors = vectors[:, :size]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embeddings(vectors, [len(i) for i in ids])

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Vectors `[len(ids), dimensions]` for checked token-id lists, in their order.

        Calls that arrive while a batch runs are merged: the thread running batches takes every call
        queued meanwhile into its next round, so concurrent small requests share jitted calls."""
        job = _Job(ids)
        with self._queue_changed:
            self._queue.append(job)
            while self._running and not job.done.is_set():
                self._queue_changed.wait()
            if job.done.is_set():
                return job.result()
            self._running = True
        try:
            while True:
                with self._queue_changed:
                    jobs, self._queue = self._queue, []
                    if not jobs:
                        break
                try:
                    vectors = self._embed_all([row for j in jobs for row in j.ids])
                    at = 0
                    for j in jobs:
                        j.vectors, at = vectors[at : at + len(j.ids)], at + len(j.ids)
                except Exception as e:  # every caller of the round learns of it
                    for j in jobs:
                        j.error = e
                with self._queue_changed:
                    for j in jobs:
                        j.done.set()
                    self._queue_changed.notify_all()
        finally:
            with self._queue_changed:
                self._running = False
                self._queue_changed.notify_all()
        return job.result()

    def _embed_all(self, ids: list[list[int]]) -> np.ndarray:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dimensions), np.float32)
        params = self.params()
        pending = [(rows, self._run(params, [ids[i] for i in rows])) for rows in self._batches(order, ids)]
        for rows, result in pending:  # dispatched ahead: the device runs while the host pads
            out[rows] = np.asarray(result)[: len(rows)]
        return out

    def _batches(self, order: list[int], ids: list[list[int]]) -> list[list[int]]:
        """Consecutive runs of the length-sorted inputs that fit the row and padded-token budgets."""
        batches: list[list[int]] = []
        for i in order:
            if batches:
                rows = batches[-1] + [i]
                if len(rows) <= MAX_BATCH_ROWS and next_power_of_2(len(rows)) * length_bucket(
                    len(ids[i])
                ) <= max(MAX_BATCH_TOKENS, length_bucket(len(ids[i]))):
                    batches[-1] = rows
                    continue
            batches.append([i])
        return batches

    def _run(self, params: dict, rows: list[list[int]]) -> jax.Array:
        shape = (next_power_of_2(len(rows)), min(length_bucket(max(map(len, rows))), self._longest_padded()))
        tokens = np.zeros(shape, np.int32)
        lengths = np.ones(shape[0], np.int32)  # filler rows: one padding token, result dropped
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = row
            lengths[r] = len(row)
        start = time.perf_counter()
        result = _embed_step(
            params,
            self._dense,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            cfg=self.cfg,
            kernels=self.kernels,
            pooling=self.spec.pooling,
            activations=tuple(layer.activation for layer in self.spec.dense),
            normalize=self.spec.normalize,
        )
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info("embedding step %d x %d compiled in %.2f s", *shape, time.perf_counter() - start)
        return result

    def _longest_padded(self) -> int:
        """Padded lengths stop at the position table (and, for a decoder, a whole number of blocks)."""
        if isinstance(self.cfg, bert.EncoderConfig):
            return self.cfg.max_tokens
        return -(-self.max_tokens // 8) * 8

    def warmup(self) -> None:
        """Compile the batch shapes serving meets most: one row, and full batches at short lengths."""
        for rows, length in ((1, MIN_LENGTH), (MAX_BATCH_ROWS, MIN_LENGTH), (MAX_BATCH_ROWS, 32)):
            self.embed_ids([[0] * min(length, self.max_tokens)] * rows)


def embedding_source(model: str | None) -> bool:
    """Whether `model` names a local sentence-embedding model folder (see `is_embedding_folder`)."""
    return model is not None and is_embedding_folder(Path(model).expanduser())


def load_embedder(
    path: Path, *, dtype: jnp.dtype, kernels: Kernels = Kernels(), tokenizer: str | None = None
) -> Embedder:
    """The embedding model in folder `path` (sentence-transformers, or an HF encoder folder)."""
    from jaxrs.config import read_json
    from jaxrs.loading.sentence_transformers import load_encoder, read_embedding_folder

    transformer, spec = read_embedding_folder(path, default_pooling=("mean",))
    tok = Tokenizer.from_hf_folder(Path(tokenizer) if tokenizer else transformer)
    raw = read_json(transformer / "config.json")
    if bert.encoder_architecture(raw) is not None:
        cfg, params = load_encoder(transformer, dtype)
        return Embedder(cfg, lambda: params, tok, spec, source=str(path), kernels=kernels)
    from jaxrs.loading import load_model

    loaded = load_model(str(transformer), dtype=dtype, tokenizer=tokenizer)
    return Embedder(
        loaded.config,
        lambda: loaded.params,
        tok,
        spec,
        source=str(path),
        kernels=kernels,
        bidirectional=bool(raw.get("use_bidirectional_attention")),
    )
