"""Where jaxrs keeps its files: the model cache and the compilation cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$JAXRS_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxrs`, else `~/.cache/jaxrs`."""
    if env := os.environ.get("JAXRS_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxrs"
