"""`pallas_kernels` stands alone: the kernels can be lifted out, or reused by another engine, without
jaxrs. Checked twice: importing every module pulls in no `jaxrs` module, and no source imports one
(which also catches an import inside a function, which loading the module would not run)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pallas_kernels

PACKAGE = Path(pallas_kernels.__file__).parent
ROOT = PACKAGE.parent

IMPORT_ALL = """
import importlib, pkgutil, sys
import pallas_kernels
for module in pkgutil.walk_packages(pallas_kernels.__path__, "pallas_kernels."):
    importlib.import_module(module.name)
print("\\n".join(sorted(name for name in sys.modules if name == "jaxrs" or name.startswith("jaxrs."))))
"""


def _is_jaxrs(module: str | None) -> bool:
    return module is not None and (module == "jaxrs" or module.startswith("jaxrs."))


def test_importing_every_module_loads_no_jaxrs():
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"importing pallas_kernels loaded {done.stdout.split()}"


def test_no_source_imports_jaxrs():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            offenders += [f"{where} imports {name}" for name in names if _is_jaxrs(name)]
    assert not offenders, "pallas_kernels must not import jaxrs:\n" + "\n".join(offenders)
