"""The runner's jitted steps as a GPU runs them: bfloat16 compute, packed weights, both Pallas kernels
compiled rather than interpreted. Here they are lowered for CUDA (every op needs a GPU lowering, the
kernels a Triton one, at the engine's real shapes and dtypes); compiling them needs a GPU.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jaxrs import LLM, SamplingParams, ops
from jaxrs.loading import device_layout
from jaxrs.ops import qmatmul_pallas
from pallas_kernels.paged_attention import paged_attention_pallas
from tests import test_model_families, test_model_families_2
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config

CONFIGS = {  # name: (config, ISQ format its matrices pack in)
    "llama": (tiny_llama_config(), "Q4_K"),
    "gemma2": (test_model_families.CONFIGS["gemma2"], "Q8_0"),  # soft-caps, sliding-window layers
    "mixtral": (test_model_families_2.CONFIGS["mixtral-3-experts-window"], "Q8_0"),  # packed experts
}


def abstract(tree):
    """Shapes and dtypes only: nothing is placed on a device the lowering does not target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steps_lower_for_cuda_with_compiled_kernels(name, tmp_path, monkeypatch):
    compiled = "pallas-compiled"
    for op, kernel in (("paged_attention", paged_attention_pallas), ("qmatmul", qmatmul_pallas)):
        monkeypatch.setitem(ops._IMPLS[op], compiled, functools.partial(kernel, interpret=False))
    # the weights in the formats a GPU holds them in, not XLA:CPU's layout (`loading.device_layout`)
    monkeypatch.setattr(device_layout, "relays_packed_weights", lambda device_layout=True: False)
    config, fmt = CONFIGS[name]
    save_tiny_hf_model(config, tmp_path)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    llm = LLM(
        str(tmp_path),
        dtype="bfloat16",
        isq=fmt,
        kernels={"paged_attention": compiled, "qmatmul": compiled},
        kv_cache_tokens=256,
        block_size=8,
        max_model_len=64,
        max_num_seqs=4,
    )
    runner = llm.engine.runner
    params, kv = abstract(runner.params), abstract(runner.kv)
    rows, width, chunk = 4, runner.width(8), 16

    batch, flags = runner.profile_batch(SamplingParams(temperature=0.7, top_p=0.9), rows)
    call = dict(cfg=runner.cfg, kernels=runner.kernels, flags=flags)
    zeros = np.zeros(rows, np.int32)
    decode = runner.steps.decode.trace(
        params, kv, zeros, zeros, np.zeros((rows, width), np.int32), np.ones(rows, bool), batch, np.int32(2),
        max_steps=2,
        **call,
    )  # fmt: skip
    batch, call["flags"] = runner.profile_batch(SamplingParams(temperature=0), rows)
    tokens, meta = np.zeros((rows, chunk), np.int32), runner._metadata([], rows, chunk, width)
    prefill = runner.steps.prefill.trace(params, kv, tokens, meta, zeros, batch, **call)
    for traced in (decode, prefill):
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text and "paged_attention_" in text and f"qmatmul_{fmt.lower()}" in text
