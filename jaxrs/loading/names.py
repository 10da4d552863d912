"""Checkpoint names: which tensor of a Hugging Face or llama.cpp checkpoint fills which model parameter.

The model's parameters are addressed by their path in the module tree (`"layers.attn.q_proj.weight"`,
`"embed.weight"`); a `CheckpointNames` maps each path to the HF tensor holding it, and llama.cpp's tensor
names to HF names, so every format fills the same tree. Paths under `layers.` name a stacked parameter:
their HF name is relative to `model.layers.{i}.`. A family file states what differs from Llama's tables.

This module is data only (no model code, no registry), so family files can import it freely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jaxrs.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows `[start, stop)` of the fused checkpoint tensor `name` (a layer suffix)."""

    name: str
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Experts:
    """One checkpoint tensor per expert (`name` has an `{e}`), stacked on a leading expert axis."""

    name: str


Source = str | Rows | Experts
HfTable = Mapping[str, Source]

LAYER_PREFIX = "layers."

# Parameter path -> HF checkpoint name (the Llama model). A table is a superset: the module tree decides
# which parameters exist (a bias only where the config asks for one), and only those are read.
LLAMA_HF: dict[str, Source] = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "final_norm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    "layers.input_norm.weight": "input_layernorm.weight",
    "layers.input_norm.bias": "input_layernorm.bias",
    **{
        f"layers.attn.{p}_proj.{kind}": f"self_attn.{p}_proj.{kind}"
        for p in "qkvo"
        for kind in ("weight", "bias")
    },
    "layers.attn.q_norm.weight": "self_attn.q_norm.weight",
    "layers.attn.k_norm.weight": "self_attn.k_norm.weight",
    "layers.post_attn_norm.weight": "post_attention_layernorm.weight",
    "layers.post_attn_norm.bias": "post_attention_layernorm.bias",
    **{
        f"layers.mlp.{p}_proj.{kind}": f"mlp.{p}_proj.{kind}"
        for p in ("gate", "up", "down")
        for kind in ("weight", "bias")
    },
}

# Gemma 2/3: norms on both sides of attention and MLP (HF's `post_attention_layernorm` is the norm after
# attention there; the norm in front of the MLP is `pre_feedforward_layernorm`).
SANDWICH_NORMS_HF: dict[str, Source] = {
    "layers.attn_out_norm.weight": "post_attention_layernorm.weight",
    "layers.post_attn_norm.weight": "pre_feedforward_layernorm.weight",
    "layers.ffn_out_norm.weight": "post_feedforward_layernorm.weight",
}

# llama.cpp tensor names -> HF names ("{i}" is the layer index), the Llama layout.
LLAMA_GGUF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# llama.cpp permutes q/k rows for its interleaved RoPE in Llama-layout files; the loader undoes it
# (value: the config attribute giving the heads to use).
LLAMA_ROPE_PERMUTED = {"blk.{i}.attn_q.weight": "num_heads", "blk.{i}.attn_k.weight": "num_kv_heads"}

GgufSplit = Mapping[str, list[tuple[str, int | slice]]]


def _llama_hf(cfg: ModelConfig) -> HfTable:
    return LLAMA_HF


@dataclasses.dataclass(frozen=True)
class CheckpointNames:
    """How a family's checkpoints name its parameters.

    hf: the config's table of parameter path -> HF source (a name, a `Rows` range of a fused tensor, or
    `Experts`); gguf: llama.cpp name -> HF name; gguf_rope_permuted: llama.cpp names whose q/k rows were
    permuted (-> the config attribute with their head count); gguf_split: llama.cpp tensors holding
    several HF tensors (-> the HF names and the row range or leading index of each);
    from_gguf_tensor: undoes a llama.cpp convert-time change of a float tensor (HF name, array).
    """

    hf: Callable[[ModelConfig], HfTable] = _llama_hf
    gguf: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(LLAMA_GGUF))
    gguf_rope_permuted: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gguf_split: Callable[[ModelConfig], GgufSplit] | None = None
    from_gguf_tensor: Callable[[str, np.ndarray], np.ndarray] | None = None


def hf_table(*tables: HfTable) -> Callable[[ModelConfig], HfTable]:
    """A config-independent table: Llama's updated with `tables` in order (later wins)."""
    merged: dict[str, Source] = dict(LLAMA_HF)
    for table in tables:
        merged.update(table)
    return lambda cfg: merged


def source_names(source: Source, cfg: ModelConfig) -> list[str]:
    """The (layer-relative, for stacked parameters) checkpoint names one table entry reads."""
    if isinstance(source, Rows):
        return [source.name]
    if isinstance(source, Experts):
        return [source.name.format(e=e) for e in range(cfg.num_experts)]
    return [source]
