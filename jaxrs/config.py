"""One normalized description of a model, whatever file format it came from.

`ModelConfig` is static (hashable): it is passed to jitted functions as a static argument, so every
field is an immutable value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxrs.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of: default, linear, llama3, freq_factors."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs.weight` (llama.cpp's llama3 form)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def rope_scaling_from_hf(raw: dict | None, path: Path) -> RopeScaling:
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(path, f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    """Normalize a transformers `config.json` dict."""
    from jaxrs.models.registry import HF_ARCHITECTURES, HF_MODEL_TYPES

    archs = raw.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None and not archs:
        arch = HF_MODEL_TYPES.get(raw.get("model_type", ""))
    if arch is None:
        raise ModelLoadError(
            path,
            f"unknown architecture {archs or raw.get('model_type')!r} "
            f"(supported: {', '.join(sorted(HF_ARCHITECTURES))})",
        )
    if raw.get("sliding_window") and raw.get("use_sliding_window", True) and arch == "llama":
        window = raw["sliding_window"]
        if window < raw.get("max_position_embeddings", 0):
            raise ModelLoadError(path, f"sliding-window attention (window {window}) is not supported yet")
    heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    rope_params = raw.get("rope_parameters") or {}
    rope_scaling = raw.get("rope_scaling") or (rope_params if rope_params.get("rope_type") else None)
    theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling_from_hf(rope_scaling, path),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_tuple(raw.get("eos_token_id")),
        name=raw.get("_name_or_path", "") or path.name,
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"invalid JSON ({e})") from None


def config_from_gguf(
    meta: dict[str, Any], path: Path, *, has_output: bool, rope_freqs: tuple[float, ...] | None = None
) -> ModelConfig:
    """Normalize GGUF metadata (`<arch>.*` keys, llama.cpp's spelling)."""
    arch = meta.get("general.architecture")
    from jaxrs.models.registry import GGUF_ARCHITECTURES

    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            path, f"unknown architecture {arch!r} (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise ModelLoadError(path, f"GGUF metadata key {full!r} is missing")
        return meta.get(full, default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:
        rope_scaling = RopeScaling(kind="freq_factors", freq_factors=rope_freqs)
    elif scaling_type == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
    elif scaling_type in ("none", None):
        rope_scaling = RopeScaling()
    else:
        raise ModelLoadError(path, f"unsupported rope scaling {scaling_type!r} (supported: none, linear)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=not has_output,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_tuple(eos),
        name=meta.get("general.name", path.stem),
    )
