"""Model configs from files: a config.json or GGUF metadata -> one normalized `ModelConfig`, completed by
the family's hooks (`FamilySpec.finish_hf_config` / `finish_gguf_config`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jaxrs.config import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    ModelConfig,
    RopeScaling,
    _as_tuple,
    normalize_window,
    pattern_layer_types,
)
from jaxrs.errors import ModelLoadError
from jaxrs.models.registry import GGUF_ARCHITECTURES, HF_ARCHITECTURES, HF_MODEL_TYPES, family


def _finish(cfg: ModelConfig, hook: str, raw: dict, path: Path) -> ModelConfig:
    """Apply the family's config hook (family defaults and quirks; a ValueError from it means
    unsupported), then normalize the window."""
    fix = getattr(family(cfg.architecture), hook)
    if fix is not None:
        try:
            cfg = fix(cfg, raw)
        except ValueError as e:  # a hook rejects a config it cannot run
            raise ModelLoadError(path, str(e)) from None
    if cfg.hidden_act not in ACTIVATIONS.values():
        raise ModelLoadError(path, f"unsupported activation {cfg.hidden_act!r}")
    try:
        return normalize_window(cfg)
    except ValueError as e:
        raise ModelLoadError(path, str(e)) from None


def longrope_attention_factor(factor: float, original: int) -> float:
    """LongRoPE's cos/sin scale when the config gives none (transformers' and llama.cpp's rule)."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_scaling_from_hf(
    raw: dict | None, path: Path, *, max_position_embeddings: int = 4096, original_max: int | None = None
) -> RopeScaling:
    """`original_max`: a top-level `original_max_position_embeddings` (Phi-3 keeps it there, and
    transformers prefers it to the one inside the rope dict for longrope, yarn and llama3; without either,
    transformers takes max_position_embeddings)."""
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type", raw.get("type", "default"))
    original = int(original_max or raw.get("original_max_position_embeddings") or max_position_embeddings)
    if kind == "default":
        return RopeScaling()
    if kind in ("longrope", "su"):
        if "short_factor" not in raw or "long_factor" not in raw:
            raise ModelLoadError(path, "longrope rope_scaling needs short_factor and long_factor")
        factor = raw.get("factor") or max_position_embeddings / original
        attention = raw.get("attention_factor")
        return RopeScaling(
            kind="longrope",
            factor=float(factor),
            original_max_position_embeddings=original,
            short_factor=tuple(float(f) for f in raw["short_factor"]),
            long_factor=tuple(float(f) for f in raw["long_factor"]),
            attention_factor=float(
                longrope_attention_factor(factor, original) if attention is None else attention
            ),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
        )
    if kind == "yarn":
        factor = float(raw.get("factor") or max_position_embeddings / original)
        return RopeScaling(
            kind="yarn",
            factor=factor,
            original_max_position_embeddings=original,
            attention_factor=yarn_attention_factor(raw, factor),
            beta_fast=float(raw.get("beta_fast") or 32),
            beta_slow=float(raw.get("beta_slow") or 1),
            truncate=bool(raw.get("truncate", True)),
        )
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings, not an original
        factor = float(raw["factor"])
        return RopeScaling("dynamic", factor, original_max_position_embeddings=max_position_embeddings)
    raise ModelLoadError(
        path,
        f"unsupported rope_scaling type {kind!r} "
        "(supported: default, linear, llama3, longrope, yarn, dynamic)",
    )


def yarn_attention_factor(raw: dict, factor: float) -> float:
    """YaRN's cos/sin scale: the config's `attention_factor`, else from `mscale` / `mscale_all_dim` when
    both are set, else 0.1 ln(factor) + 1 (transformers' rule)."""
    if raw.get("attention_factor") is not None:
        return float(raw["attention_factor"])

    def mscale(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if raw.get("mscale") and raw.get("mscale_all_dim"):
        return mscale(raw["mscale"]) / mscale(raw["mscale_all_dim"])
    return mscale(1.0)


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    """Normalize a transformers `config.json` dict."""
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
    heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    rope_params = raw.get("rope_parameters") or {}
    local_theta = raw.get("rope_local_base_freq")
    local: dict = {}
    if "full_attention" in rope_params:  # per layer type (transformers 5's Gemma 3): each its own RoPE
        local = rope_params.get("sliding_attention") or {}
        local_theta = local.get("rope_theta", local_theta)
        rope_params = rope_params["full_attention"] or {}
    rope_scaling = raw.get("rope_scaling") or (rope_params if rope_params.get("rope_type") else None)
    theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    head_dim = raw.get("head_dim") or hidden // heads
    partial = raw.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial) if family(arch).partial_rotary else head_dim
    max_pos = raw.get("max_position_embeddings", 4096)
    original_max = raw.get("original_max_position_embeddings")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ModelLoadError(path, f"unsupported activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling_from_hf(
            rope_scaling, path, max_position_embeddings=max_pos, original_max=original_max
        ),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_tuple(raw.get("eos_token_id")),
        name=raw.get("_name_or_path", "") or path.name,
        hidden_act=ACTIVATIONS[act],
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        layer_types=tuple(raw.get("layer_types") or ()),
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar"),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        rope_local_theta=None if local_theta is None else float(local_theta),
        rope_local_scaling=rope_scaling_from_hf(
            local, path, max_position_embeddings=max_pos, original_max=original_max
        ),
        rotary_dim=rotary_dim if rotary_dim != head_dim else None,
    )
    return _finish(cfg, "finish_hf_config", raw, path)


def gguf_yarn(meta: dict[str, Any], arch: str, path: Path) -> RopeScaling:
    """YaRN as llama.cpp reads it: factor, original length and the betas; cos/sin scaled by llama.cpp's
    magnitude, 0.1 ln(factor) + 1, or with `yarn_log_multiplier` L (transformers' `mscale_all_dim`)
    mscale(factor, 1) / mscale(factor, L), times `attn_factor` (default 1; llama.cpp multiplies the
    magnitude by it). The keys llama.cpp reads only for other architectures (a model-specific
    `yarn_attn_factor`, an extrapolation factor other than 1) are refused, naming them."""
    key = f"{arch}.rope.scaling."
    odd = ["yarn_attn_factor"] if key + "yarn_attn_factor" in meta else []
    if meta.get(key + "yarn_ext_factor", 1.0) != 1.0:
        odd.append("yarn_ext_factor")
    if odd:
        raise ModelLoadError(path, f"unsupported YaRN metadata {', '.join(key + k for k in odd)}")
    factor = float(meta[key + "factor"])
    log_multiplier = float(meta.get(key + "yarn_log_multiplier", 0.0))
    magnitude = yarn_attention_factor({"mscale": 1.0, "mscale_all_dim": log_multiplier}, factor)
    return RopeScaling(
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=int(meta[key + "original_context_length"]),
        attention_factor=magnitude * float(meta.get(key + "attn_factor", 1.0)),
        beta_fast=float(meta.get(key + "yarn_beta_fast", 32.0)),
        beta_slow=float(meta.get(key + "yarn_beta_slow", 1.0)),
    )


def config_from_gguf(
    meta: dict[str, Any],
    path: Path,
    *,
    has_output: bool,
    rope_freqs: tuple[float, ...] | None = None,
    rope_factors: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> ModelConfig:
    """Normalize GGUF metadata (`<arch>.*` keys, llama.cpp's spelling). `rope_freqs`: the
    `rope_freqs.weight` tensor (llama3 scaling); `rope_factors`: `rope_factors_long.weight` and
    `rope_factors_short.weight` (Phi-3's LongRoPE)."""
    arch = meta.get("general.architecture")
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
    context = int(get("context_length", 4096))
    if rope_factors is not None:
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", context))
        attention = meta.get(f"{arch}.rope.scaling.attn_factor")
        rope_scaling = RopeScaling(
            kind="longrope",
            factor=context / original,
            original_max_position_embeddings=original,
            long_factor=rope_factors[0],
            short_factor=rope_factors[1],
            attention_factor=float(
                longrope_attention_factor(context / original, original) if attention is None else attention
            ),
        )
    elif rope_freqs is not None:
        rope_scaling = RopeScaling(kind="freq_factors", freq_factors=rope_freqs)
    elif scaling_type == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
    elif scaling_type == "yarn":
        rope_scaling = gguf_yarn(meta, arch, path)
    elif scaling_type in ("none", None):
        rope_scaling = RopeScaling()
    else:
        raise ModelLoadError(
            path, f"unsupported rope scaling {scaling_type!r} (supported: none, linear, yarn)"
        )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    num_layers = int(get("block_count"))
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer, true = sliding
        layer_types = tuple(SLIDING if p else FULL for p in pattern)
    else:
        layer_types = () if pattern is None else pattern_layer_types(num_layers, int(pattern))
    local_theta = meta.get(f"{arch}.rope.freq_base_swa")
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary_dim = meta.get(f"{arch}.rope.dimension_count")
    eps = meta.get(
        f"{arch}.attention.layer_norm_rms_epsilon", meta.get(f"{arch}.attention.layer_norm_epsilon")
    )
    cfg = ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(1e-5 if eps is None else eps),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=context,
        tie_word_embeddings=not has_output,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_tuple(eos),
        name=meta.get("general.name", path.stem),
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        layer_types=layer_types,
        attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping"),
        rope_local_theta=None if local_theta is None else float(local_theta),
        rotary_dim=None if rotary_dim in (None, head_dim) else int(rotary_dim),
        num_experts=int(meta.get(f"{arch}.expert_count", 0)),
        num_experts_per_tok=int(meta.get(f"{arch}.expert_used_count", 0)),
    )
    return _finish(cfg, "finish_gguf_config", meta, path)
