"""Gemma 3 (text): Gemma 2's layer with q/k RMSNorms and no soft-capping; local (sliding) layers use
their own RoPE base (`rope_local_base_freq`, 10000), unscaled unless transformers 5's per-layer-type
`rope_parameters` give them a scaling, global layers the main RoPE and its scaling; the layer pattern
comes from `layer_types` (or `sliding_window_pattern`, default 6).
"""

from __future__ import annotations

import dataclasses

from jaxrs.config import ModelConfig
from jaxrs.loading.names import SANDWICH_NORMS_HF, CheckpointNames, hf_table
from jaxrs.models import gemma2
from jaxrs.models.gemma import from_gguf_tensor
from jaxrs.models.spec import FamilySpec

LOCAL_ROPE_THETA = 10000.0


def finish_hf_config(cfg: ModelConfig, raw: dict) -> ModelConfig:
    """transformers' Gemma 3 defaults for keys a config.json leaves out. Its attention never soft-caps
    scores, whatever `attn_logit_softcapping` says (the config keeps the key, the model does not read it)."""
    cfg = gemma2.finish_hf_config(cfg, raw, pattern=6, final_logit_softcapping=None)
    cfg = dataclasses.replace(cfg, attn_logit_softcap=None)
    if "rope_theta" not in raw and "rope_theta" not in (raw.get("rope_parameters") or {}).get(
        "full_attention", {}
    ):
        cfg = dataclasses.replace(cfg, rope_theta=1_000_000.0)
    return dataclasses.replace(cfg, rope_local_theta=cfg.rope_local_theta or LOCAL_ROPE_THETA)


def finish_gguf_config(cfg: ModelConfig, meta: dict) -> ModelConfig:
    """llama.cpp's Gemma 3: five sliding layers then a global one, local RoPE base 10000, no caps."""
    cfg = gemma2.finish_gguf_config(cfg, meta, pattern=6, layers_27b=62)
    arch = meta["general.architecture"]
    return dataclasses.replace(
        cfg,
        attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping"),
        rope_local_theta=cfg.rope_local_theta or LOCAL_ROPE_THETA,
    )


SPEC = FamilySpec(
    name="gemma3",
    hf_architectures=("Gemma3ForCausalLM",),
    hf_model_types=("gemma3_text",),
    gguf_architectures=("gemma3",),
    qk_norm=True,
    sandwich_norms=True,
    finish_hf_config=finish_hf_config,
    finish_gguf_config=finish_gguf_config,
    names=CheckpointNames(
        hf=hf_table(SANDWICH_NORMS_HF),
        gguf=gemma2.GGUF_NAMES
        | {
            "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
            "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
        },
        from_gguf_tensor=from_gguf_tensor,
    ),
)
