"""Running a test module as a child process on N simulated CPU devices: the device count must be set
before JAX starts, so it never leaks into the other test files of the same worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def simulated_env(devices: int) -> dict[str, str]:
    """This process's environment with `devices` simulated CPU devices and this tree's packages first."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    flags = f"--xla_force_host_platform_device_count={devices}"
    return os.environ | {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def run_json(module: str, args: list[str], devices: int, timeout: float = 900) -> dict:
    """`python -m module *args` on `devices` simulated devices; its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=simulated_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
