"""Architecture name -> model family. Adding a family: one file in `models/` plus a line here.

A family file declares what differs from the shared decoder (`models/decoder.py`): HF_ARCHITECTURES,
HF_MODEL_TYPES, GGUF_ARCHITECTURES, GGUF_NAMES; optionally GGUF_ROPE_PERMUTED, TOP_WEIGHTS,
layer_weights(cfg) (its per-layer weight table), finish_hf_config(cfg, raw) / finish_gguf_config(cfg,
meta) (family defaults and quirks of the config), from_gguf_tensor(hf_name, array) (undo a llama.cpp
convert-time change of a tensor) and gguf_split(cfg) (llama.cpp tensors holding several HF tensors:
fused q/k/v, 3-D experts). `Family` supplies the rest from the decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.models import decoder, gemma, gemma2, gemma3, llama, mixtral, phi, phi3, qwen2, starcoder2


@dataclasses.dataclass(frozen=True)
class Family:
    """A family file seen through the shared decoder's defaults."""

    module: ModuleType

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def layer_weights(self, cfg: ModelConfig) -> dict:
        own = getattr(self.module, "layer_weights", None)
        return own(cfg) if own else decoder.layer_weights(cfg)

    @property
    def top_weights(self) -> dict[str, str]:
        return getattr(self.module, "TOP_WEIGHTS", decoder.TOP_WEIGHTS)

    def hf_weight_names(self, cfg: ModelConfig) -> list[str]:
        """Every checkpoint tensor this config needs."""
        return decoder.hf_weight_names(cfg, self.layer_weights(cfg), self.top_weights)

    def params_from_hf(self, get: Callable[[str], np.ndarray], cfg: ModelConfig, dtype: jnp.dtype) -> dict:
        """The parameter pytree from a getter of HF-named tensors, layers stacked."""
        return decoder.params_from_hf(get, cfg, dtype, self.layer_weights(cfg), self.top_weights)

    forward = staticmethod(decoder.forward)
    compute_logits = staticmethod(decoder.compute_logits)


FAMILIES: dict[str, Family] = {
    name: Family(module)
    for name, module in {
        "llama": llama,
        "qwen2": qwen2,
        "gemma": gemma,
        "gemma2": gemma2,
        "gemma3": gemma3,
        "phi": phi,
        "phi3": phi3,
        "starcoder2": starcoder2,
        "mixtral": mixtral,
    }.items()
}

HF_ARCHITECTURES = {arch: key for key, fam in FAMILIES.items() for arch in fam.HF_ARCHITECTURES}
HF_MODEL_TYPES = {t: key for key, fam in FAMILIES.items() for t in fam.HF_MODEL_TYPES}
GGUF_ARCHITECTURES = {arch: key for key, fam in FAMILIES.items() for arch in fam.GGUF_ARCHITECTURES}


def family(architecture: str) -> Family:
    return FAMILIES[architecture]
