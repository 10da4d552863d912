"""Architecture name -> model family module. Adding a family: one file in `models/` plus a line here.

A family module provides: HF_ARCHITECTURES, HF_MODEL_TYPES, GGUF_ARCHITECTURES, GGUF_NAMES,
GGUF_ROPE_PERMUTED, hf_weight_names(cfg), params_from_hf(get, cfg, dtype), forward(...), compute_logits(...).
"""

from __future__ import annotations

from types import ModuleType

from jaxrs.models import llama

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
}

HF_ARCHITECTURES = {arch: key for key, mod in FAMILIES.items() for arch in mod.HF_ARCHITECTURES}
HF_MODEL_TYPES = {t: key for key, mod in FAMILIES.items() for t in mod.HF_MODEL_TYPES}
GGUF_ARCHITECTURES = {arch: key for key, mod in FAMILIES.items() for arch in mod.GGUF_ARCHITECTURES}


def family(architecture: str) -> ModuleType:
    return FAMILIES[architecture]
