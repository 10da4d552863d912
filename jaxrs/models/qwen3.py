"""Qwen3 (`Qwen3ForCausalLM`): Qwen2's layer without the q/k/v biases (`attention_bias` adds them, o_proj
included) and with an RMSNorm over each head's queries and keys before RoPE; head_dim comes from the
config (128 in the released models, whatever hidden / heads is). The window rule is Qwen2's.

llama.cpp's `qwen3` files: the Llama names plus `attn_q_norm` / `attn_k_norm`, no q/k permutation.
"""

from __future__ import annotations

from jaxrs.loading.names import LLAMA_GGUF, CheckpointNames
from jaxrs.models import qwen2
from jaxrs.models.spec import FamilySpec

SPEC = FamilySpec(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    qk_norm=True,
    finish_hf_config=qwen2.finish_hf_config,
    names=CheckpointNames(
        gguf=LLAMA_GGUF
        | {f"blk.{{i}}.attn_{p}_norm.weight": f"model.layers.{{i}}.self_attn.{p}_norm.weight" for p in "qk"}
    ),
)
