"""jaxrs: a pure-JAX/XLA inference engine for large language models."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "JaxrsError", "ModelLoadError", "RequestOutput", "SamplingParams"]

_EXPORTS = {
    "LLM": "jaxrs.llm",
    "RequestOutput": "jaxrs.llm",
    "SamplingParams": "jaxrs.engine.sampling",
    "JaxrsError": "jaxrs.errors",
    "ModelLoadError": "jaxrs.errors",
}

if TYPE_CHECKING:
    from jaxrs.engine.sampling import SamplingParams
    from jaxrs.errors import JaxrsError, ModelLoadError
    from jaxrs.llm import LLM, RequestOutput


def __getattr__(name: str):
    """Import lazily, so `import jaxrs.loading...` does not pull in the engine (and JAX start-up)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxrs' has no attribute {name!r}")
