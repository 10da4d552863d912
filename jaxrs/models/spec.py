"""`FamilySpec`: what one model family is, as data.

The shared decoder (`models/decoder.py`) is built from the config plus the few structural choices a
config.json does not state (q/k norms, sandwich norms, a gated MLP, an output-head bias); the config
hooks fill family defaults and quirks into a `ModelConfig`; `names` says how its checkpoints name the
parameters. Each family file defines one `SPEC`; `models/registry.py` lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxrs.config import ModelConfig
from jaxrs.loading.names import CheckpointNames

ConfigHook = Callable[[ModelConfig, dict], ModelConfig]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """A model family. Structure flags add pieces to every layer; the config decides the rest (biases,
    LayerNorm, parallel attention + MLP, MoE, windows)."""

    name: str  # registry key, `ModelConfig.architecture`
    hf_architectures: tuple[str, ...] = ()  # config.json `architectures`
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type`, when `architectures` is absent
    gguf_architectures: tuple[str, ...] = ()  # GGUF `general.architecture`
    qkv_bias: bool = False  # q/k/v projections have biases whatever `attention_bias` says (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Gemma 3)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)
    gated_mlp: bool = True  # act(gate(x)) * up(x); False: act(up(x)) (Phi-2, Starcoder2)
    head_bias: bool = False  # the output head has a bias (Phi-2)
    # config.json's `partial_rotary_factor` applies (Phi); transformers' other families rotate whole heads
    partial_rotary: bool = False
    finish_hf_config: ConfigHook | None = None  # (cfg, config.json dict) -> cfg; ValueError: unsupported
    finish_gguf_config: ConfigHook | None = None  # (cfg, GGUF metadata) -> cfg
    names: CheckpointNames = CheckpointNames()
