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
    """RoPE frequency scaling. `kind` is one of: default, linear, llama3, freq_factors, longrope, yarn,
    dynamic.

    longrope (Phi-3 "su"): frequencies divided by `short_factor` while a sequence is at most
    `original_max_position_embeddings` long, by `long_factor` once it is longer (chosen per sequence and
    step, as transformers does), and cos/sin times `attention_factor`.
    yarn: frequencies blended between divided by `factor` and unchanged over the dims between the
    `beta_fast` and `beta_slow` rotation counts of `original_max_position_embeddings`, cos/sin times
    `attention_factor`. dynamic (NTK): the base grows with the sequence's length once it passes
    `original_max_position_embeddings` (the config's max_position_embeddings), per sequence and step.
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs.weight` (llama.cpp's llama3 form)
    short_factor: tuple[float, ...] | None = None  # longrope: per frequency, for short sequences
    long_factor: tuple[float, ...] | None = None  # longrope: per frequency, past the original length
    attention_factor: float = 1.0  # longrope, yarn: cos and sin are scaled by this
    beta_fast: float = 32.0  # yarn: rotations below which a dim is interpolated...
    beta_slow: float = 1.0  # ...and above which it keeps its frequency
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dims

    @property
    def by_length(self) -> bool:
        """The rotation depends on the sequence's length (not only on the position): keys already in the
        cache keep the one they were written with, so cached blocks cannot be shared."""
        return self.kind in ("longrope", "dynamic")


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
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: the main RoPE
    rope_local_scaling: RopeScaling = RopeScaling()  # sliding layers' own scaling, with rope_local_theta
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
    def rope_by_length(self) -> bool:
        """Some layer's rotation depends on the sequence's length (`RopeScaling.by_length`)."""
        return self.rope_scaling.by_length or self.rope_local_scaling.by_length

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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"invalid JSON ({e})") from None


_MOVED = ("config_from_hf", "config_from_gguf", "rope_scaling_from_hf", "longrope_attention_factor")


def __getattr__(name: str) -> Any:
    """Parsing configs moved to `jaxrs.loading.model_config` (it needs the family registry, which needs
    this module); the old names still resolve, with a warning."""
    if name in _MOVED:
        import warnings

        from jaxrs.loading import model_config

        warnings.warn(f"jaxrs.config.{name} moved to jaxrs.loading.model_config", DeprecationWarning, 2)
        return getattr(model_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
