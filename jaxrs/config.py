"""One normalized description of a model, whatever file format it came from.

`ModelConfig` is static (hashable): it is passed to jitted functions as a static argument, so every
field is an immutable value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxrs.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of: default, linear, llama3, freq_factors, longrope.

    longrope (Phi-3 "su"): frequencies divided by `short_factor` while a sequence is at most
    `original_max_position_embeddings` long, by `long_factor` once it is longer (chosen per sequence and
    step, as transformers does), and cos/sin times `attention_factor`.
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs.weight` (llama.cpp's llama3 form)
    short_factor: tuple[float, ...] | None = None  # longrope: per frequency, for short sequences
    long_factor: tuple[float, ...] | None = None  # longrope: per frequency, past the original length
    attention_factor: float = 1.0  # longrope: cos and sin are scaled by this


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
    rms_norm_eps: float = 1e-6  # epsilon of every norm (RMSNorm, or LayerNorm with `layer_norm`)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    hidden_act: str = "silu"  # MLP activation: silu, gelu_tanh or gelu (exact)
    norm_offset: float = 0.0  # RMSNorm scales by `norm_offset + weight` (Gemma: 1, it stores weight - 1)
    embedding_scale: float | None = None  # token embeddings times this, in the compute dtype (Gemma)
    sliding_window: int | None = None  # keys a sliding layer sees: positions > query position - window
    layer_types: tuple[str, ...] = ()  # per layer: "sliding_attention" | "full_attention"; () = all full
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: main
    rotary_dim: int | None = None  # RoPE rotates only the first `rotary_dim` dims of a head (Phi); None: all
    layer_norm: bool = False  # norms are LayerNorm (mean-centred, bias when the checkpoint has one)
    parallel_block: bool = False  # attention and MLP read one normalized input, both add to the residual
    num_experts: int = 0  # sparse MoE MLP (Mixtral): experts per layer; 0 = dense MLP
    num_experts_per_tok: int = 0  # experts each token is routed to

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


# Activation names (transformers' ACT2FN spelling) -> ours.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}
SLIDING, FULL = "sliding_attention", "full_attention"


def pattern_layer_types(num_layers: int, period: int) -> tuple[str, ...]:
    """llama.cpp's `set_swa_pattern(period)`: each run of `period` layers is sliding but its last
    (Gemma 2: 2, Gemma 3: 6); period 0: every layer sliding."""
    return tuple(SLIDING if period == 0 or i % period < period - 1 else FULL for i in range(num_layers))


def normalize_window(cfg: ModelConfig) -> ModelConfig:
    """No window, or no sliding layer, or a window no sequence can exceed: plain full attention."""
    types = cfg.layer_types or (SLIDING,) * cfg.num_layers
    if len(types) != cfg.num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"layer_types {types!r} do not give one of {SLIDING!r}/{FULL!r} per layer")
    window = cfg.sliding_window
    if not window or window >= cfg.max_position_embeddings or SLIDING not in types:
        return dataclasses.replace(cfg, sliding_window=None, layer_types=())
    return dataclasses.replace(cfg, sliding_window=int(window), layer_types=tuple(types))


def _finish(cfg: ModelConfig, hook: str, raw: dict, path: Path) -> ModelConfig:
    """Apply the family's config hook (family defaults and quirks; a ValueError from it means
    unsupported), then normalize the window."""
    from jaxrs.models.registry import family

    fix = getattr(family(cfg.architecture), hook, None)
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
    transformers prefers it to the one inside the rope dict)."""
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind in ("longrope", "su"):
        if "short_factor" not in raw or "long_factor" not in raw:
            raise ModelLoadError(path, "longrope rope_scaling needs short_factor and long_factor")
        original = int(original_max or raw.get("original_max_position_embeddings") or max_position_embeddings)
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
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(
        path, f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, longrope)"
    )


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
    heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    rope_params = raw.get("rope_parameters") or {}
    local_theta = raw.get("rope_local_base_freq")
    if "full_attention" in rope_params:  # per layer type (Gemma 3): global layers' and sliding layers'
        local = rope_params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(path, f"unsupported sliding-layer rope type {local['rope_type']!r}")
        local_theta = local.get("rope_theta", local_theta)
        rope_params = rope_params["full_attention"] or {}
    rope_scaling = raw.get("rope_scaling") or (rope_params if rope_params.get("rope_type") else None)
    theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    head_dim = raw.get("head_dim") or hidden // heads
    partial = raw.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    max_pos = raw.get("max_position_embeddings", 4096)
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
            rope_scaling,
            path,
            max_position_embeddings=max_pos,
            original_max=raw.get("original_max_position_embeddings"),
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
        rotary_dim=rotary_dim if rotary_dim != head_dim else None,
    )
    return _finish(cfg, "finish_hf_config", raw, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"invalid JSON ({e})") from None


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
    elif scaling_type in ("none", None):
        rope_scaling = RopeScaling()
    else:
        raise ModelLoadError(path, f"unsupported rope scaling {scaling_type!r} (supported: none, linear)")
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
