"""The container files, checked statically: hadolint (when installed), and every flag their
entrypoints and commands pass exists in `jaxrs serve`; the pieces a GPU deployment relies on are there
(non-root user, the data volume holding HF_HOME, port 8080, a health check on /health, the GPU
reservation and restart policy of the compose file)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from jaxrs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def serve_flags() -> set[str]:
    """Every option string `jaxrs serve` takes."""
    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions if "serve" in a.choices).choices["serve"]
    return {flag for action in serve._actions for flag in action.option_strings}


def instructions(path: Path) -> dict[str, list[str]]:
    """Dockerfile instruction -> its arguments (continuation lines joined), each occurrence in order."""
    out: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name):
    found = instructions(ROOT / name)
    entry = json.loads(found["ENTRYPOINT"][-1])
    assert entry[:2] == ["jaxrs", "serve"]
    args = entry + json.loads(found["CMD"][-1])
    unknown = set(flags_in(args)) - serve_flags()
    assert not unknown, f"{name} passes flags jaxrs serve does not take: {unknown}"
    assert found["USER"][-1].split(":")[0] not in ("0", "root")
    assert "8080" in found["EXPOSE"][-1] and "--port" in entry and "8080" in entry
    assert "/health" in found["HEALTHCHECK"][-1]
    assert '"/data"' in found["VOLUME"][-1] and "HF_HOME=/data/" in found["ENV"][0]


def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["jaxrs"]
    unknown = set(flags_in(service["command"])) - serve_flags()
    assert not unknown, f"docker-compose.yml passes flags jaxrs serve does not take: {unknown}"
    assert service["restart"] == "unless-stopped"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/data") for v in service["volumes"])


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (the test extra)")
def test_hadolint_is_clean():
    proc = subprocess.run(["hadolint", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
