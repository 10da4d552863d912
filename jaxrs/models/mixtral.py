"""Mixtral (`MixtralForCausalLM`): the Llama/Mistral attention with a sparse MoE MLP: a router picks
each token's top-k experts (softmax over the chosen logits), each expert a SwiGLU MLP; expert weights
are stacked `[layers, experts, out, in]` and run as grouped matmuls (`decoder._moe`).

llama.cpp writes Mixtral as `llama` with `llama.expert_count` (the llama family's GGUF hook sends it
here), q/k permuted like Llama, experts either as 3-D `blk.N.ffn_{gate,up,down}_exps` tensors (newer
files; split per expert at load) or one `blk.N.ffn_{gate,up,down}.E` tensor per expert (older files).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.models import decoder
from jaxrs.models.decoder import Experts
from jaxrs.models.llama import GGUF_ROPE_PERMUTED  # noqa: F401

HF_ARCHITECTURES = ("MixtralForCausalLM",)
HF_MODEL_TYPES = ("mixtral",)
GGUF_ARCHITECTURES: tuple[str, ...] = ()  # reached through `llama` + expert_count

_MOE = "model.layers.{i}.block_sparse_moe."
# HF expert matrices: w1 = gate, w3 = up, w2 = down; llama.cpp's names for each.
_EXPERT_MATS = {"experts_gate": ("w1", "gate"), "experts_up": ("w3", "up"), "experts_down": ("w2", "down")}
GGUF_NAMES = {k: v for k, v in decoder.GGUF_NAMES.items() if ".ffn_" not in k or "ffn_norm" in k} | {
    "blk.{i}.ffn_gate_inp.weight": _MOE + "gate.weight",
    **{
        f"blk.{{i}}.ffn_{g}.{{e}}.weight": f"{_MOE}experts.{{e}}.{w}.weight" for w, g in _EXPERT_MATS.values()
    },
}


def gguf_split(cfg: ModelConfig) -> dict[str, list[tuple[str, int | slice]]]:
    """The 3-D `ffn_*_exps` tensors: expert e is index e of the leading axis."""
    return {
        f"blk.{{i}}.ffn_{g}_exps.weight": [
            (f"{_MOE}experts.{e}.{w}.weight", e) for e in range(cfg.num_experts)
        ]
        for w, g in _EXPERT_MATS.values()
    }


def layer_weights(cfg: ModelConfig) -> dict[str, str | Experts]:
    table = {
        k: v for k, v in decoder.layer_weights(cfg).items() if not k.startswith(("gate_", "up_", "down_"))
    }
    table["router"] = "block_sparse_moe.gate.weight"
    for key, (w, _) in _EXPERT_MATS.items():
        table[key] = Experts(f"block_sparse_moe.experts.{{e}}.{w}.weight")
    return table


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    return dataclasses.replace(
        cfg,
        num_experts=int(raw.get("num_local_experts", 8)),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
    )
