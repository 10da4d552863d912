"""Tiny models of several families on 1, 2, 4 and 8 simulated CPU devices: greedy tokens and the
log-probabilities of a continuation, as JSON on stdout, with transformers' log-probabilities beside.

Run as its own process with the device count set before JAX starts (`test_parallel_tensor.py` does):
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.tensor_parallel OUT_DIR [RUN/TP ...]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen2Config

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from jaxrs.ops import Kernels
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, max_position_embeddings=256)
GQA8 = dict(SMALL, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
CONFIGS = {  # 8 query heads, 2 KV heads: TP 4 and 8 repeat KV heads
    "llama": LlamaConfig(**GQA8, tie_word_embeddings=False),
    "qwen2-tied-bias": Qwen2Config(**GQA8, tie_word_embeddings=True),
    "mixtral": MixtralConfig(**GQA8, num_local_experts=4, num_experts_per_tok=2),
}
# (config, ISQ format or None, kernel choices, tensor-parallel sizes)
RUNS = {
    "llama": ("llama", None, {}, (1, 2, 4, 8)),
    "llama-q8_0": ("llama", "Q8_0", {}, (1, 2, 4, 8)),
    "llama-pallas": ("llama", None, {"paged_attention": "pallas"}, (1, 4)),  # interpret mode per shard
    "llama-reisq": ("llama", None, {}, (2,)),  # then re-quantized to Q8_0 while sharded
    "qwen2-tied-bias": ("qwen2-tied-bias", None, {}, (1, 2, 4, 8)),
    "mixtral": ("mixtral", None, {}, (1, 2, 4, 8)),
}
PROMPTS = [list(range(5, 10)), list(range(40, 51))]
SCORED = list(range(60, 76))  # scored as 6 prompt tokens and 10 continuation tokens
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
ENGINE = dict(
    kv_cache_tokens=256,
    kv_cache_dtype="float32",
    block_size=8,
    max_model_len=64,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    max_decode_steps=2,
)


def run(folder: Path, isq: str | None, kernels: dict, tp: int, requantize: str | None = None) -> dict:
    """Greedy tokens of PROMPTS submitted together, and SCORED's continuation log-probabilities; with
    `requantize`, the greedy tokens again after re-quantizing to that format."""
    engine = Engine(
        load_model(str(folder), dtype=jnp.float32, isq=isq),
        EngineConfig(**ENGINE, tensor_parallel_size=tp),
        kernels=Kernels.from_mapping(kernels),
        dtype=jnp.float32,
    )
    out = {
        "tokens": greedy(engine),
        "logprobs": engine.score(SCORED[:6], SCORED[6:]),
        "kv_spec": str(engine.runner.kv.k.sharding.spec) if tp > 1 else "",
    }
    if requantize:
        engine.requantize(requantize)
        out["requantized_tokens"] = greedy(engine)
    return out


def greedy(engine: Engine) -> list[list[int]]:
    """PROMPTS' greedy tokens, submitted together."""
    requests = [engine.add_request(p, GREEDY) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    return [r.seqs[0].output_ids for r in requests]


def reference(model) -> list[float]:
    """transformers' log-probabilities of SCORED's continuation."""
    with torch.no_grad():
        logits = model(torch.tensor([SCORED])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1).numpy()
    return [float(logprobs[i - 1, SCORED[i]]) for i in range(6, len(SCORED))]


def main(out: Path, only: list[str]) -> int:
    """Every run of RUNS, or only those named `RUN/TP` in `only`."""
    results: dict = {}
    for run_name, (config, isq, kernels, sizes) in RUNS.items():
        sizes = [tp for tp in sizes if not only or f"{run_name}/{tp}" in only]
        if not sizes:
            continue
        folder = out / config
        if not folder.exists():
            model = save_tiny_hf_model(CONFIGS[config], folder, seed=len(config))
            save_tiny_tokenizer(folder, CONFIGS[config].vocab_size)
            results[f"{config}/transformers"] = reference(model)
        for tp in sizes:
            requantize = "Q8_0" if run_name.endswith("-reisq") else None
            results[f"{run_name}/{tp}"] = run(folder, isq, kernels, tp, requantize)
            print(run_name, tp, results[f"{run_name}/{tp}"]["tokens"], flush=True, file=sys.stderr)
    print(json.dumps(results, default=lambda a: np.asarray(a).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
