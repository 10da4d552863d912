"""Architecture name -> model family. Adding a family: one file in `models/` defining `SPEC` (a
`FamilySpec`: the decoder pieces it adds, its config hooks, its checkpoint names) plus a line here."""

from __future__ import annotations

from jaxrs.errors import JaxrsError
from jaxrs.models import gemma, gemma2, gemma3, llama, mixtral, phi, phi3, qwen2, qwen3, starcoder2
from jaxrs.models.spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {
    module.SPEC.name: module.SPEC
    for module in (llama, qwen2, qwen3, gemma, gemma2, gemma3, phi, phi3, starcoder2, mixtral)
}

HF_ARCHITECTURES = {arch: key for key, fam in FAMILIES.items() for arch in fam.hf_architectures}
HF_MODEL_TYPES = {t: key for key, fam in FAMILIES.items() for t in fam.hf_model_types}
GGUF_ARCHITECTURES = {arch: key for key, fam in FAMILIES.items() for arch in fam.gguf_architectures}


def family(architecture: str) -> FamilySpec:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise JaxrsError(f"unknown architecture {architecture!r} (known: {', '.join(FAMILIES)})") from None
