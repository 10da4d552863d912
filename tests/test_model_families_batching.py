"""Every family's tiny configs through the whole engine: prompts batched give the tokens each gives alone.

The sweep runs in fresh processes (`tests/family_batching.py` says why), two at once, half the configs
each: compiling is mostly single-threaded, so on a two-core machine the second core would sit idle.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp

from jaxrs.engine.engine import Engine
from jaxrs.loading import load_model
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.family_batching import CONFIGS, ENGINE, generate

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
TIMEOUT_S = 600  # about 50 s on an idle two-core machine


def test_every_family_batched_equals_alone():
    names = list(CONFIGS)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "tests.family_batching"]
    workers = [
        subprocess.Popen(
            [*command, *names[i::WORKERS]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [w.communicate(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    finally:
        for w in workers:
            w.kill()
    report = "".join(out for out, _ in outputs)
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, f"{report}\n{err[-3000:]}"
    assert sorted(line.split()[0] for line in report.splitlines() if line.endswith(" ok")) == sorted(names)


def test_longrope_chunked_prefill_equals_whole(tmp_path):
    """Every chunk of a prefill picks LongRoPE's factor set by the whole prefill's length (here past
    original_max_position_embeddings), so chunks rotate their keys as one whole-prompt call would."""
    config = CONFIGS["phi3-longrope-window"]  # original_max_position_embeddings 16
    save_tiny_hf_model(config, tmp_path, seed=3)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    loaded = load_model(str(tmp_path))
    prompt = list(range(100, 121))  # 21 tokens: long factors
    chunked, whole = (
        generate(
            Engine(loaded, dataclasses.replace(ENGINE, max_num_batched_tokens=n), dtype=jnp.float32), [prompt]
        )
        for n in (16, 64)
    )
    assert chunked == whole
