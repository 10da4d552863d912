"""Sampling parameters and the on-device sampler.

The sampler runs inside the jitted step. A request's random draw depends only on its seed and the
index of the token being drawn (`fold_in(key(seed), step)`), never on the batch it rides in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.errors import JaxrsError


@dataclasses.dataclass
class SamplingParams:
    """What to generate. Fields left as None take the model's generation_config.json values, then
    the defaults (temperature 1, no top-k/top-p/min-p filtering). temperature 0 means greedy."""

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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature is None or self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise JaxrsError(message)

    def with_defaults(self, generation_config: dict[str, Any]) -> SamplingParams:
        """Fill unset fields from the model's generation config (only when it samples by default)."""
        sampled = generation_config.get("do_sample", True)
        fill = {
            "temperature": generation_config.get("temperature", 1.0) if sampled else 0.0,
            "top_k": generation_config.get("top_k", 0) if sampled else 0,
            "top_p": generation_config.get("top_p", 1.0) if sampled else 1.0,
            "min_p": generation_config.get("min_p") or 0.0,
        }
        return dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_arrays(params: list[SamplingParams], seeds: list[int], steps: list[int], batch: int) -> dict:
    """Per-row sampling inputs for a padded batch (padding rows are greedy)."""
    pad = batch - len(params)
    return {
        "temperature": np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
        "top_k": np.array([p.top_k for p in params] + [0] * pad, np.int32),
        "top_p": np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
        "min_p": np.array([p.min_p for p in params] + [0.0] * pad, np.float32),
        "seed": np.array(seeds + [0] * pad, np.uint32),
        "step": np.array(steps + [0] * pad, np.int32),
    }


def sample(logits: jax.Array, arrays: dict, *, all_greedy: bool) -> jax.Array:
    """Token ids `[B]` from f32 logits `[B, V]`: temperature, then top-k, top-p, min-p, then a draw."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy
    temperature = arrays["temperature"]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    vocab = logits.shape[-1]
    ranks = jnp.arange(vocab)[None, :]
    top_k = jnp.where(arrays["top_k"] > 0, arrays["top_k"], vocab)[:, None]
    keep = ranks < top_k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    keep &= (cumulative - probs) < arrays["top_p"][:, None]  # the first token always stays
    keep &= probs >= arrays["min_p"][:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed: jax.Array, step: jax.Array, row: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(arrays["seed"], arrays["step"], masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
