"""Speculative decoding settings, in vLLM's `speculative_config` keys (users' configs carry over),
read without importing JAX (the CLI parses them).

`{"method": "draft_model", "model": PATH, "num_speculative_tokens": K}` (with the draft's own load
options `gguf_file`, `dtype`, `isq`, `packed`) or `{"method": "ngram", "num_speculative_tokens": K,
"prompt_lookup_max": 4, "prompt_lookup_min": 1}`. A config that names a `model` and no method is a
draft model's. `"adaptive_k": true` lets each sequence propose fewer than K drafts while its own drafts
are rarely kept (`adaptive_k`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from jaxrs.errors import JaxrsError

METHODS = ("draft_model", "ngram")
MAX_SPECULATIVE_TOKENS = 16  # verify steps compile K + 1 positions per row; more is never worth it


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How draft tokens are proposed and how many per step (K, static for an engine)."""

    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft_model: the draft's source (a GGUF, an HF folder, a catalog name)
    gguf_file: str | None = None
    dtype: str | None = None  # default: the target's compute dtype
    isq: str | None = None
    packed: bool | None = None
    prompt_lookup_max: int = 4  # ngram: longest suffix matched
    prompt_lookup_min: int = 1  # ngram: shortest suffix matched
    adaptive_k: bool = False  # fewer drafts for a sequence whose drafts are rarely kept

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise JaxrsError(
                f"speculative_config method must be one of {', '.join(METHODS)}, not {self.method!r}"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise JaxrsError(
                f"speculative_config num_speculative_tokens must be an integer in "
                f"[1, {MAX_SPECULATIVE_TOKENS}], not {k!r}"
            )
        if self.method == "draft_model" and not self.model:
            raise JaxrsError('speculative_config method "draft_model" needs "model" (the draft\'s path)')
        if not isinstance(self.adaptive_k, bool):
            raise JaxrsError(f"speculative_config adaptive_k must be true or false, not {self.adaptive_k!r}")
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise JaxrsError(
                    "speculative_config needs integers 1 <= prompt_lookup_min <= prompt_lookup_max, "
                    f"not {lo!r} and {hi!r}"
                )

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a mapping, a JSON object string, or None (no speculation); unknown keys are an error
        naming them."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise JaxrsError(f"speculative_config is not valid JSON ({e})") from None
        if not isinstance(value, Mapping):
            raise JaxrsError(f"speculative_config must be a JSON object, not {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise JaxrsError(
                f"speculative_config has unknown keys {unknown}; known: {', '.join(sorted(known))}"
            )
        fields = dict(value)
        fields.setdefault("method", "draft_model" if fields.get("model") else None)
        if "num_speculative_tokens" not in fields:
            raise JaxrsError("speculative_config needs num_speculative_tokens")
        return cls(**fields)


def from_flags(
    config_json: str | None, draft_model: str | None, num_speculative_tokens: int | None
) -> dict[str, Any] | None:
    """The `speculative_config` of the command line: `--speculative-config JSON`, or the shorthand
    `--draft-model PATH --num-speculative-tokens K` (which may also override the JSON's keys)."""
    if config_json is None and draft_model is None and num_speculative_tokens is None:
        return None
    config = dict(SpeculativeConfig.parse(config_json).__dict__) if config_json else {}
    if draft_model is not None:
        config.update(method="draft_model", model=draft_model)
    if num_speculative_tokens is not None:
        config["num_speculative_tokens"] = num_speculative_tokens
    if "num_speculative_tokens" not in config:
        raise JaxrsError("--draft-model needs --num-speculative-tokens K")
    return dict(SpeculativeConfig.parse(config).__dict__)
