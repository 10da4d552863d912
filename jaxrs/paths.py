"""Where jaxrs keeps its files: the model cache and the compilation cache."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache (once per process) so a restart skips recompiling.

    `$JAXRS_COMPILATION_CACHE` names the folder (default: `<cache_dir>/xla`, on CPU a subfolder per
    processor model, see `cpu_cache_name`); "off" disables it. A cache folder the user already configured
    for JAX is left alone. jax 0.10.0's CPU executable serialization once crashed the process (SIGSEGV in
    `put_executable_and_time`), so the cache was off on CPU; jax 0.10.2 writes and reads every step we
    compile (scan and unrolled layers, float32 and packed weights, XLA and interpreted Pallas kernels),
    so it is on (bench/RESULTS.md, "Ready in seconds").
    """
    import jax

    setting = os.environ.get("JAXRS_COMPILATION_CACHE", "")
    if setting.lower() == "off":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if setting:
        folder = Path(setting).expanduser()
    else:
        folder = cache_dir() / "xla"
        if jax.default_backend() == "cpu":
            folder /= cpu_cache_name()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX skips compiles under a second by default; our step compiles are often just under.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def cpu_cache_name() -> str:
    """`cpu-<hash>` of this processor's model and instruction-set flags. JAX's cache key names the
    platform ("cpu") but not the host's instruction set, which XLA:CPU compiles for: a cache shared with
    another machine (a network home folder) could hand this one code it cannot run."""
    facts = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features"))]
        facts += "".join(dict.fromkeys(lines))  # every core repeats them
    except OSError:
        facts += platform.processor()
    return "cpu-" + hashlib.sha256(facts.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """`$JAXRS_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxrs`, else `~/.cache/jaxrs`."""
    if env := os.environ.get("JAXRS_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxrs"
