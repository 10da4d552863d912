"""Where jaxrs keeps its files: the model cache and the compilation cache."""

from __future__ import annotations

import os
from pathlib import Path


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache (once per process) so a restart skips recompiling.

    `$JAXRS_COMPILATION_CACHE` names the folder (default: `<cache_dir>/xla`); "off" disables it. A cache
    folder the user already configured for JAX is left alone. On CPU it is off unless a folder is named:
    jax 0.10's CPU executable serialization crashed the process (SIGSEGV in `put_executable_and_time`)
    on some of our steps.
    """
    import jax

    setting = os.environ.get("JAXRS_COMPILATION_CACHE", "")
    if setting.lower() == "off" or (not setting and jax.default_backend() == "cpu"):
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(setting).expanduser() if setting else cache_dir() / "xla"
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX skips compiles under a second by default; our step compiles are often just under.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def cache_dir() -> Path:
    """`$JAXRS_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxrs`, else `~/.cache/jaxrs`."""
    if env := os.environ.get("JAXRS_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxrs"
