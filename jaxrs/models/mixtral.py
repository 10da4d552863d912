"""Mixtral (`MixtralForCausalLM`): the Llama/Mistral attention with a sparse MoE MLP: a router picks
each token's top-k experts (softmax over the chosen logits), each expert a SwiGLU MLP; expert weights
are stacked `[layers, experts, out, in]` and run as grouped matmuls (`decoder.MoE`).

llama.cpp writes Mixtral as `llama` with `llama.expert_count` (the llama family's GGUF hook sends it
here), q/k permuted like Llama, experts either as 3-D `blk.N.ffn_{gate,up,down}_exps` tensors (newer
files; split per expert at load) or one `blk.N.ffn_{gate,up,down}.E` tensor per expert (older files).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.loading.names import LLAMA_GGUF, LLAMA_ROPE_PERMUTED, CheckpointNames, Experts, GgufSplit, hf_table
from jaxrs.models.spec import FamilySpec

_MOE = "model.layers.{i}.block_sparse_moe."
# HF expert matrices: w1 = gate, w3 = up, w2 = down; llama.cpp's names for each.
_EXPERT_MATS = {"gate_proj": ("w1", "gate"), "up_proj": ("w3", "up"), "down_proj": ("w2", "down")}
_HF_NAMES = {
    "layers.mlp.router.weight": "block_sparse_moe.gate.weight",
    **{
        f"layers.mlp.{key}.weight": Experts(f"block_sparse_moe.experts.{{e}}.{w}.weight")
        for key, (w, _) in _EXPERT_MATS.items()
    },
}
_GGUF_NAMES = {k: v for k, v in LLAMA_GGUF.items() if ".ffn_" not in k or "ffn_norm" in k} | {
    "blk.{i}.ffn_gate_inp.weight": _MOE + "gate.weight",
    **{
        f"blk.{{i}}.ffn_{g}.{{e}}.weight": f"{_MOE}experts.{{e}}.{w}.weight" for w, g in _EXPERT_MATS.values()
    },
}


def gguf_split(cfg: ModelConfig) -> GgufSplit:
    """The 3-D `ffn_*_exps` tensors: expert e is index e of the leading axis."""
    return {
        f"blk.{{i}}.ffn_{g}_exps.weight": [
            (f"{_MOE}experts.{e}.{w}.weight", e) for e in range(cfg.num_experts)
        ]
        for w, g in _EXPERT_MATS.values()
    }


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    return dataclasses.replace(
        cfg,
        num_experts=int(raw.get("num_local_experts", 8)),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
    )


SPEC = FamilySpec(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    # reached through `llama` + expert_count
    finish_hf_config=finish_hf_config,
    names=CheckpointNames(
        hf=hf_table(_HF_NAMES),
        gguf=_GGUF_NAMES,
        gguf_rope_permuted=LLAMA_ROPE_PERMUTED,
        gguf_split=gguf_split,
    ),
)
