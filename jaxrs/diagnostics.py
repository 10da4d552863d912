"""Clear one-line messages for the failures a deployment meets most (README, "Troubleshooting"): the
CUDA backend not starting, the device out of memory, the server's port taken. `explain` turns such an
exception into the message the CLI prints; anything else keeps its traceback."""

from __future__ import annotations

import errno
import logging
import os
import socket

from jaxrs.errors import JaxrsError

CUDA_FIX = (
    'install the CUDA wheels with `pip install -e ".[cuda12]"` (they bring CUDA\'s own libraries), '
    "check that `nvidia-smi` sees the GPU, and drop LD_LIBRARY_PATH entries pointing at another CUDA; "
    "JAX_PLATFORMS=cpu runs on the CPU instead"
)
OOM_FIX = (
    "give the KV cache less (--kv-cache-fraction 0.7, --kv-cache-mb or --kv-cache-tokens, a shorter "
    "--max-model-len), keep the weights packed or quantize them smaller (--isq Q4K; `jaxrs quantize` "
    "once on a machine with more memory), or split the model over more devices (--tensor-parallel-size)"
)


def explain(error: BaseException) -> str | None:
    """The message for a known failure, or None."""
    text = str(error)
    if "Unable to initialize backend 'cuda'" in text:
        return f"the CUDA backend did not start ({text.splitlines()[0][:200]}): {CUDA_FIX}"
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or isinstance(error, MemoryError):
        return f"out of memory ({text.splitlines()[0][:200] or type(error).__name__}): {OOM_FIX}"
    return None


def check_port(host: str, port: int) -> None:
    """Fail now, before minutes of loading, if the server could not listen on `host:port`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise JaxrsError(
                    f"port {port} on {host} is in use (another jaxrs serve?): choose another with --port, "
                    f"or stop the process holding it (`ss -ltnp 'sport = :{port}'` names it)"
                ) from None
            raise JaxrsError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def check_backend() -> None:
    """Start JAX's backend now: a GPU asked for (JAX_PLATFORMS=cuda) that does not start is a clear
    error, and a GPU left idle (JAX on the CPU beside an NVIDIA device) a warning in the log."""
    import jax

    wanted = os.environ.get("JAX_PLATFORMS", "")
    try:
        jax.devices()
    except Exception as e:
        if "cuda" in wanted or "gpu" in wanted:
            first = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
            raise JaxrsError(f"the CUDA backend did not start ({first}): {CUDA_FIX}") from None
        raise
    idle = gpu_left_idle()
    if idle:
        logging.getLogger("jaxrs").warning("%s", idle)


def gpu_left_idle() -> str | None:
    """A warning when an NVIDIA GPU is present but JAX runs on the CPU (the CUDA wheels are missing)."""
    import jax

    if jax.default_backend() == "cpu" and os.path.exists("/dev/nvidiactl"):
        return f"an NVIDIA GPU is present but JAX runs on the CPU: {CUDA_FIX.split(', and drop')[0]}"
    return None
