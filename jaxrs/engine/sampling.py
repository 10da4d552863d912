"""Sampling parameters and the on-device sampler.

The sampler runs inside the jitted step. The host packs each batch's parameters into padded NumPy
arrays (`build_sampling_batch`) plus a few static flags (`SamplingFlags`) that switch off work no row
needs, so the common path (no penalties, no bias, no top logprobs) carries and computes nothing extra.

On device, after vLLM's token limits (bans for min_tokens and bad_words, allowed_token_ids), in
mistral.rs order: repetition / presence / frequency penalties, logit bias, then
temperature, top-k, top-p, min-p, then a seeded draw. Greedy rows (temperature 0) take the argmax after
penalties and bias. A request's random draw depends only on its seed and the index of the token being
drawn (`fold_in(key(seed), step)`), never on the batch it rides in: every step below is row-wise, and
neutral settings leave a row's logits bit-for-bit unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.structured.grammar import Grammar
from jaxrs.structured.mask import apply_token_mask
from pallas_kernels.shapes import next_power_of_2

MAX_LOGPROBS = 20
# Sizes the top-logprobs output is rounded up to, so few values of the static flag ever compile.
TOP_LOGPROB_SIZES = (0, 1, 2, 4, 8, MAX_LOGPROBS)


@dataclasses.dataclass
class SamplingParams:
    """What to generate (vLLM / OpenAI semantics). Fields left as None take the model's
    generation_config.json values, then the defaults (temperature 1, no top-k/top-p/min-p filtering,
    repetition penalty 1). temperature 0 means greedy.

    n: number of samples for the request. repetition_penalty (HF): logits of tokens seen in the prompt
    or the output are divided by it when positive, multiplied when negative. presence_penalty and
    frequency_penalty (OpenAI, output tokens only): logit -= presence * (count > 0) + frequency * count.
    logit_bias: token id -> value added to its logit. logprobs: None for none, 0 for the chosen token's
    log-probability, k > 0 for the k most likely alternatives too (of the model's raw distribution).
    grammar: the output must match it (JSON schema, regex, choice, Lark; see `jaxrs.structured`).

    vLLM's extras: min_tokens: no EOS / stop token may be drawn, and no stop string ends the output,
    before that many tokens. allowed_token_ids: only these may be drawn. bad_words: a word's last token
    is banned wherever the output ends with the word's other tokens. truncate_prompt_tokens: only the
    prompt's last N tokens are fed (-1: as many as the model serves). prompt_logprobs: the prompt tokens'
    log-probabilities, with that many alternatives (the `LLM` and completions API).
    eos_token_ids and bad_words_token_ids are filled by the engine (`resolve_token_ids`).
    """

    max_tokens: int = 16
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # vLLM's: the stop string (or stop token's text) kept
    n: int = 1
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    lora: str | None = None  # the LoRA adapter (by name) the request runs with; None: the base model
    grammar: Grammar | None = None
    speculative: bool = True  # False: this request never speculates (when the engine does)
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # the model's, held back by min_tokens (unless ignore_eos)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # each bad word's spellings as token ids

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        if self.top_k == -1:  # vLLM's spelling of "no top-k"
            self.top_k = 0
        if self.logit_bias is not None:  # JSON gives string keys
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise JaxrsError(f"logit_bias must map integer token ids to numbers ({e})") from None
        self.validate()

    def validate(self) -> None:
        """Raise JaxrsError naming the first bad field (NaN fails every range check)."""
        bias = self.logit_bias or {}
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.n >= 1, "n must be at least 1"),
            (self.temperature is None or self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0 (0 or -1 disables it)"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                "repetition_penalty must be > 0 (1 disables it)",
            ),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (all(t >= 0 for t in bias), "logit_bias token ids must be >= 0"),
            (all(-100 <= v <= 100 for v in bias.values()), "logit_bias values must be in [-100, 100]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (all(self.stop), "stop strings must not be empty"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (
                self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                "allowed_token_ids must not be empty",
            ),
            (
                self.truncate_prompt_tokens is None
                or self.truncate_prompt_tokens == -1
                or self.truncate_prompt_tokens >= 1,
                "truncate_prompt_tokens must be >= 1, or -1 (the model's limit)",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (all(w.strip() for w in self.bad_words or []), "bad_words must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise JaxrsError(message)

    def with_defaults(self, generation_config: dict[str, Any]) -> SamplingParams:
        """Fill unset fields from the model's generation config (the filters only when it samples by
        default; the repetition penalty always, as HF applies it to greedy decoding too)."""
        sampled = generation_config.get("do_sample", True)
        fill = {
            "temperature": generation_config.get("temperature", 1.0) if sampled else 0.0,
            "top_k": generation_config.get("top_k", 0) if sampled else 0,
            "top_p": generation_config.get("top_p", 1.0) if sampled else 1.0,
            "min_p": generation_config.get("min_p") or 0.0,
            "repetition_penalty": generation_config.get("repetition_penalty") or 1.0,
        }
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether the token history changes this request's logits."""
        return (
            self.repetition_penalty not in (None, 1.0)
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    @property
    def bans_follow_output(self) -> bool:
        """Whether the tokens this request bans change with each output token (a bad word of several
        tokens), so it decodes one token per call and never speculates."""
        return any(len(word) > 1 for word in self.bad_words_token_ids)

    def banned_ids(self, output_ids: list[int]) -> list[tuple[int, int]]:
        """(token id, the token index it is banned before) pairs after `output_ids`: the stop and EOS
        tokens before min_tokens, and each bad word's last token where the output ends with the rest."""
        bans = []
        if self.min_tokens:
            stops = set(self.stop_token_ids) | (set() if self.ignore_eos else set(self.eos_token_ids))
            bans += [(t, self.min_tokens) for t in sorted(stops)]
        for word in self.bad_words_token_ids:
            *head, last = word
            if not head or list(output_ids[len(output_ids) - len(head) :]) == head:
                bans.append((last, NEVER))
        return bans


NEVER = 2**31 - 1  # a ban's end that no token index reaches


def truncated_prompt(prompt_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The prompt's last `keep` tokens (vLLM's truncate_prompt_tokens; -1: as many as leave room for
    one generated token; None: the whole prompt)."""
    if keep is None:
        return prompt_ids
    keep = max_model_len - 1 if keep == -1 else keep
    return prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids


def resolve_token_ids(params: SamplingParams, tokenizer: Any, eos_token_ids: Iterable[int]) -> SamplingParams:
    """`params` with the token ids its text fields stand for: the model's EOS ids (for min_tokens) and
    each bad word as tokens, alone and after a space (vLLM's spellings: the spaced one when it is a
    different token sequence of the same length)."""
    words: list[tuple[int, ...]] = []
    for word in params.bad_words or []:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        words += [bare] if bare else []
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            words.append(spaced)
    resolved = dataclasses.replace(
        params, eos_token_ids=tuple(sorted(set(eos_token_ids))), bad_words_token_ids=tuple(words)
    )
    # A draft cannot see bans that follow its own drafted tokens.
    return dataclasses.replace(resolved, speculative=params.speculative and not resolved.bans_follow_output)


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """Static (jit-time) facts about a batch; each False / 0 skips a stage of the sampler."""

    all_greedy: bool
    penalties: bool  # some row has a repetition, presence or frequency penalty
    logit_bias: bool  # some row has a logit bias
    top_logprobs: int  # alternatives returned per row, rounded up to TOP_LOGPROB_SIZES
    filters: bool = False  # some sampled row has top-k, top-p or min-p
    bans: bool = False  # some row bans tokens (min_tokens, bad_words)
    allowed: bool = False  # some row may draw only its allowed_token_ids


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] f32: log_softmax of the raw logits at the chosen token
    top_ids: jax.Array  # [B, K] int32: the K most likely tokens of the raw distribution, best first
    top_logprobs: jax.Array  # [B, K] f32


def _round_top_logprobs(k: int) -> int:
    return next(size for size in TOP_LOGPROB_SIZES if size >= k)


def _pad_rows(rows: list[np.ndarray], batch: int, minimum: int, fill: float, dtype: type) -> np.ndarray:
    """Stack ragged 1-D rows into [batch, L] (L a power of two >= `minimum`, so the widths compile a
    handful of times), padded with `fill`."""
    out = np.full((batch, next_power_of_2(max((len(r) for r in rows), default=0), minimum)), fill, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def build_sampling_batch(
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    batch: int,
    vocab_size: int,
) -> tuple[dict[str, np.ndarray], SamplingFlags]:
    """Per-row sampler inputs for a batch padded to `batch` rows (padding rows are greedy and neutral),
    and the flags that say which stages run. `steps[i]` is the index of the token row i draws next.

    Always: temperature, top_p, min_p [B] f32; top_k [B] i32 (0 = off); seed [B] u32; step [B] i32.
    With flags.penalties: repetition_penalty, presence_penalty, frequency_penalty [B] f32, and the
    token histories prompt_ids [B, Lp] (each prompt's distinct tokens) and output_ids [B, Lo] (every
    output token, for counts) as int32, padded with `vocab_size`, which the device scatter drops. Rows
    without penalties carry empty histories. With flags.logit_bias: bias_ids [B, K] int32 (padded with
    `vocab_size`) and bias_values [B, K] f32. With flags.bans: ban_ids [B, K] int32 (padded with
    `vocab_size`) and ban_until [B, K] int32, the token index each ban ends at (`SamplingParams.banned_ids`
    after `output_ids`). With flags.allowed: allowed_ids [B, K] int32 (padded with `vocab_size`) and
    allowed_only [B] bool. L and K are powers of two, to bound recompiles.
    """
    pad = batch - len(params)
    if pad < 0:
        raise ValueError(f"{len(params)} rows do not fit a batch of {batch}")

    def column(values: list, fill: float, dtype: type) -> np.ndarray:
        return np.array(list(values) + [fill] * pad, dtype)

    def value(x: float | None, default: float) -> float:
        return default if x is None else x

    arrays = {
        "temperature": column([value(p.temperature, 1.0) for p in params], 0.0, np.float32),
        # k at or past the vocabulary keeps everything: clamp so any int fits int32.
        "top_k": column([min(value(p.top_k, 0), vocab_size) for p in params], 0, np.int32),
        "top_p": column([value(p.top_p, 1.0) for p in params], 1.0, np.float32),
        "min_p": column([value(p.min_p, 0.0) for p in params], 0.0, np.float32),
        "seed": column([s & 0xFFFFFFFF for s in seeds], 0, np.uint32),
        "step": column(steps, 0, np.int32),
    }
    top = max((p.logprobs or 0 for p in params), default=0)
    flags = SamplingFlags(
        all_greedy=not bool(np.any(arrays["temperature"] > 0)),
        penalties=any(p.has_penalties for p in params),
        logit_bias=any(p.logit_bias for p in params),
        top_logprobs=_round_top_logprobs(top),
        bans=any(p.min_tokens or p.bad_words_token_ids for p in params),
        allowed=any(p.allowed_token_ids is not None for p in params),
        filters=bool(
            np.any(
                (arrays["temperature"] > 0)
                & ((arrays["top_k"] > 0) | (arrays["top_p"] < 1) | (arrays["min_p"] > 0))
            )
        ),
    )
    if flags.penalties:
        arrays["repetition_penalty"] = column(
            # Clamped into f32 range: an overflow to inf would turn a zero logit into NaN.
            [min(value(p.repetition_penalty, 1.0), 1e30) for p in params],
            1.0,
            np.float32,
        )
        arrays["presence_penalty"] = column([p.presence_penalty for p in params], 0.0, np.float32)
        arrays["frequency_penalty"] = column([p.frequency_penalty for p in params], 0.0, np.float32)
        empty = np.zeros(0, np.int32)
        arrays["prompt_ids"] = _pad_rows(
            [
                np.unique(np.asarray(ids, np.int32)) if p.has_penalties else empty
                for p, ids in zip(params, prompt_ids, strict=True)
            ],
            batch,
            16,
            vocab_size,
            np.int32,
        )
        arrays["output_ids"] = _pad_rows(
            [
                np.asarray(ids, np.int32) if p.has_penalties else empty
                for p, ids in zip(params, output_ids, strict=True)
            ],
            batch,
            16,
            vocab_size,
            np.int32,
        )
    if flags.logit_bias:
        biases = [p.logit_bias or {} for p in params]
        arrays["bias_ids"] = _pad_rows(
            [np.fromiter(b.keys(), np.int32, len(b)) for b in biases], batch, 4, vocab_size, np.int32
        )
        arrays["bias_values"] = _pad_rows(
            [np.fromiter(b.values(), np.float32, len(b)) for b in biases], batch, 4, 0.0, np.float32
        )
    if flags.bans:
        bans = [p.banned_ids(ids) for p, ids in zip(params, output_ids, strict=True)]
        arrays["ban_ids"] = _pad_rows([[t for t, _ in b] for b in bans], batch, 4, vocab_size, np.int32)
        arrays["ban_until"] = _pad_rows([[u for _, u in b] for b in bans], batch, 4, 0, np.int32)
    if flags.allowed:
        allowed = [p.allowed_token_ids or [] for p in params]
        arrays["allowed_ids"] = _pad_rows(allowed, batch, 4, vocab_size, np.int32)
        arrays["allowed_only"] = column([p.allowed_token_ids is not None for p in params], False, bool)
    return arrays, flags


def apply_token_limits(logits: jax.Array, batch: dict, flags: SamplingFlags) -> jax.Array:
    """In rows that list allowed tokens, every other token becomes -inf; then banned tokens (while the
    token index `step` is below the ban's end) do too, unless that would leave the row nothing to draw:
    there the bans yield. A grammar that can only end (EOS alone allowed) under min_tokens therefore
    ends the output rather than drawing a token it forbids (a stop token ends the output however early:
    `OutputProcessor.append_token`)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    if flags.allowed:
        listed = jnp.zeros(logits.shape, bool).at[rows, batch["allowed_ids"]].set(True, mode="drop")
        logits = jnp.where(listed | ~batch["allowed_only"][:, None], logits, -jnp.inf)
    if flags.bans:
        active = batch["step"][:, None] < batch["ban_until"]
        banned = logits.at[rows, batch["ban_ids"]].min(jnp.where(active, -jnp.inf, jnp.inf), mode="drop")
        left = jnp.any(banned > -jnp.inf, axis=-1, keepdims=True)
        logits = jnp.where(left, banned, logits)
    return logits


def _token_counts(ids: jax.Array, vocab: int) -> jax.Array:
    """[B, L] padded token ids -> [B, V] int32 occurrence counts (out-of-range padding is dropped)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, ids].add(1, mode="drop")


def apply_penalties_and_bias(logits: jax.Array, batch: dict, flags: SamplingFlags) -> jax.Array:
    """Repetition (HF: prompt and output), then presence and frequency (OpenAI: output), then logit bias.
    These change what greedy rows pick too (as in vLLM)."""
    vocab = logits.shape[-1]
    if flags.penalties:
        output = _token_counts(batch["output_ids"], vocab)
        seen = (_token_counts(batch["prompt_ids"], vocab) > 0) | (output > 0)
        rep = batch["repetition_penalty"][:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - (
            batch["presence_penalty"][:, None] * (output > 0) + batch["frequency_penalty"][:, None] * output
        )
    if flags.logit_bias:
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, batch["bias_ids"]].add(batch["bias_values"], mode="drop")
    return logits


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 values (so thresholds can be searched bit-exactly)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _lowest_key(keys: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per row, the smallest key t such that `enough(t)` holds (monotone in t), by bisection over int32.

    On a CPU, 32 passes of compare-and-sum cost far less than sorting the vocabulary, and give the same
    threshold exactly (bench/RESULTS.md, "Sampler cost on CPU").
    """
    lo = jnp.min(keys, axis=-1) - 1  # enough(lo) is False for every filter used here
    hi = jnp.max(keys, axis=-1)  # enough(hi) is True

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        ok = enough(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _cutoff(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the lowest logit kept by top-k then top-p, found exactly over the whole vocabulary.

    Two 32-step bisections over the bit patterns instead of a full sort, which costs several times as
    much on a CPU (bench/RESULTS.md, "Sampler cost on CPU").
    """
    keys = _order_keys(scaled)
    k_cut = _lowest_key(keys, lambda t: jnp.sum(keys > t[:, None], axis=-1) < top_k)
    in_k = keys >= k_cut[:, None]
    weights = jnp.where(in_k, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
    probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
    p_cut = _lowest_key(keys, lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < top_p)
    cut = jnp.where(top_p >= 1.0, k_cut, jnp.maximum(k_cut, p_cut))  # top_p 1 is off, whatever the rounding
    return jnp.min(jnp.where(keys >= cut[:, None], scaled, jnp.inf), axis=-1)


def _temperature_and_filters(logits: jax.Array, batch: dict, flags: SamplingFlags) -> jax.Array:
    """Sampled rows: divide by temperature, then keep the top-k, then the smallest set of tokens whose
    probability (within the top-k) reaches top-p, then tokens with at least min-p times the top
    probability; the rest become -inf. Greedy rows pass through unchanged. The kept set is "logit >= the
    last kept logit" (ties at the cut all stay)."""
    temperature = batch["temperature"]
    sampled = temperature > 0
    scaled = jnp.where(sampled[:, None], logits / jnp.where(sampled, temperature, 1.0)[:, None], logits)
    if not flags.filters:
        return scaled
    vocab = logits.shape[-1]
    top_k = jnp.where(batch["top_k"] > 0, jnp.minimum(batch["top_k"], vocab), vocab)
    keep = scaled >= _cutoff(scaled, top_k, batch["top_p"])[:, None]
    # min-p: p / p_max = exp(v - v_max).
    keep &= scaled >= jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(batch["min_p"])[:, None]
    return jnp.where(sampled[:, None] & ~keep, -jnp.inf, scaled)


def process_logits(logits: jax.Array, batch: dict, flags: SamplingFlags) -> jax.Array:
    """The [B, V] logits the draw uses: penalties and bias, then (sampled rows) temperature and the
    top-k / top-p / min-p filters as -inf. Greedy rows take the argmax of their row. A `token_mask`
    in the batch (packed, see `jaxrs.structured.mask`) comes first: disallowed tokens become -inf, as do
    banned ones and those outside a row's allowed_token_ids (`apply_token_limits`)."""
    logits = logits.astype(jnp.float32)
    if "token_mask" in batch:
        logits = apply_token_mask(logits, batch["token_mask"])
    logits = apply_penalties_and_bias(apply_token_limits(logits, batch, flags), batch, flags)
    return logits if flags.all_greedy else _temperature_and_filters(logits, batch, flags)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first maximum; the first NaN if there is one) from two plain
    reductions: XLA:CPU runs argmax's (value, index) pair reduction one element at a time, a visible
    share of a 32-row decode step (bench/RESULTS.md, "Sampler cost on CPU")."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1] - 1), axis=-1)


def draw(processed: jax.Array, seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One token per row of processed logits [B, V] (-inf: excluded), drawn with the uniform of
    `fold_in(key(seed), step)`: the same seed and token index give the same draw in any batch."""

    def one(seed: jax.Array, step: jax.Array, row: jax.Array) -> jax.Array:
        # Inverse CDF with one uniform per row: exact, and far cheaper on a CPU than drawing a
        # Gumbel number for every vocabulary entry. The first index whose CDF passes u is the
        # number of entries at or below u (the CDF never decreases).
        u = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step))
        cdf = jnp.cumsum(jax.nn.softmax(row))
        return jnp.minimum(jnp.sum(cdf <= u * cdf[-1], dtype=jnp.int32), row.shape[-1] - 1)

    return jax.vmap(one)(seeds, steps, processed)


def pick(processed: jax.Array, batch: dict, flags: SamplingFlags) -> jax.Array:
    """Next tokens from processed logits: the argmax for greedy rows, a seeded draw for the others."""
    tokens = first_argmax(processed)
    if flags.all_greedy:
        return tokens
    return jnp.where(batch["temperature"] > 0, draw(processed, batch["seed"], batch["step"]), tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array, flags: SamplingFlags) -> SampleOutput:
    """`tokens` with the raw distribution's log-probability of each and its top `flags.top_logprobs`
    alternatives (logits [B, V] f32)."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - log_norm
    if flags.top_logprobs:
        top_logits, top_ids = jax.lax.top_k(logits, flags.top_logprobs)
        top_logprobs = top_logits - log_norm[:, None]
    else:
        top_logprobs, top_ids = jnp.zeros((logits.shape[0], 0), jnp.float32), jnp.zeros((logits.shape[0], 0))
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def sample(logits: jax.Array, batch: dict, flags: SamplingFlags) -> SampleOutput:
    """Next tokens from f32 logits [B, V] (see `build_sampling_batch` for `batch`), with the raw
    distribution's log-probability of each chosen token and its top `flags.top_logprobs` alternatives.

    Under sampled flags, whether any row samples is decided at run time: a batch of greedy rows takes
    the argmax alone, so one compiled step serves greedy and sampled batches at the greedy sampler's
    cost for greedy ones. The argmax stays outside the conditional, where XLA fuses it with the other
    passes over the logits (inside, a 32-row batch of a 262k vocabulary took 20 ms more on CPU)."""
    logits = logits.astype(jnp.float32)
    limited = process_logits(logits, batch, dataclasses.replace(flags, all_greedy=True))
    greedy = first_argmax(limited)  # greedy rows' tokens: temperature and filters leave those rows be
    if flags.all_greedy:
        return token_logprobs(logits, greedy, flags)

    def drawn() -> jax.Array:
        processed = _temperature_and_filters(limited, batch, flags)
        return jnp.where(batch["temperature"] > 0, draw(processed, batch["seed"], batch["step"]), greedy)

    tokens = jax.lax.cond(jnp.any(batch["temperature"] > 0), drawn, lambda: greedy)
    return token_logprobs(logits, tokens, flags)
