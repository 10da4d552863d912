"""`jaxrs run` and the GGUF load path import neither torch nor transformers (seconds of start-up and
hundreds of MiB), and litestar only comes with `serve`."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
import jaxrs.cli, jaxrs.llm, jaxrs.engine.engine
from jaxrs.loading import gguf_file, gguf_reader, gguf_tokenizer, gguf_metadata
print(" ".join(sorted(m for m in ("torch", "transformers", "litestar") if m in sys.modules)))
"""


def test_the_run_path_imports_no_torch_transformers_or_litestar():
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == ""
