"""Architecture name -> model family module. Adding a family: one file in `models/` plus a line here.

A family module provides: HF_ARCHITECTURES, HF_MODEL_TYPES, GGUF_ARCHITECTURES, GGUF_NAMES,
GGUF_ROPE_PERMUTED, hf_weight_names(cfg), params_from_hf(get, cfg, dtype), forward(...), compute_logits(...);
optionally finish_hf_config(cfg, raw) / finish_gguf_config(cfg, meta) (family defaults and quirks of
the config), from_gguf_tensor(hf_name, array) (undo a llama.cpp convert-time change of a tensor) and
gguf_split(cfg) (llama.cpp tensors holding several HF tensors: fused q/k/v, 3-D experts).
Most of it comes from the shared decoder (`models/decoder.py`).
"""

from __future__ import annotations

from types import ModuleType

from jaxrs.models import gemma, gemma2, gemma3, llama, mixtral, phi, phi3, qwen2, starcoder2

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen2,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi": phi,
    "phi3": phi3,
    "starcoder2": starcoder2,
    "mixtral": mixtral,
}

HF_ARCHITECTURES = {arch: key for key, mod in FAMILIES.items() for arch in mod.HF_ARCHITECTURES}
HF_MODEL_TYPES = {t: key for key, mod in FAMILIES.items() for t in mod.HF_MODEL_TYPES}
GGUF_ARCHITECTURES = {arch: key for key, mod in FAMILIES.items() for arch in mod.GGUF_ARCHITECTURES}


def family(architecture: str) -> ModuleType:
    return FAMILIES[architecture]
