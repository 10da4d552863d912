"""Every model family's tiny config on 1, 2, 4 and 8 simulated CPU devices: greedy tokens with their
log-probabilities, as JSON on stdout, with transformers' log-probabilities of the same tokens beside.

Each model is built and loaded once; every run places its own copy (from host memory, so placing
compiles nothing) and runs through the whole engine. Runs go two at a time: XLA compiles one step
mostly on one core, and compiling is most of a run.

Run as its own process with the device count set before JAX starts (`test_parallel_tensor.py` does):
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.tensor_parallel OUT_DIR`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

from jaxrs.config import FULL, SLIDING
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import LoadedModel, load_model
from jaxrs.ops import Kernels
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.test_isq import write_tiny_gguf

# 8 query heads over 2 KV heads: TP 4 and 8 repeat KV heads; 2 layers (one sliding, one full where
# the family mixes them)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(TINY, head_dim=16)  # q size 128 != hidden
CONFIGS = {  # one per family of `jaxrs.models.registry.FAMILIES`
    "llama": LlamaConfig(**TINY, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),  # q/k/v biases, tied embeddings
    "qwen3": Qwen3Config(**GEMMA),  # per-head q/k norms, head_dim from the config
    "gemma": GemmaConfig(**GEMMA),
    "gemma2": Gemma2Config(
        **GEMMA,
        sliding_window=8,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0,  # small caps so they bite
        final_logit_softcapping=2.0,
    ),
    "gemma3": Gemma3TextConfig(
        **GEMMA, layer_types=[SLIDING, FULL], sliding_window=8, query_pre_attn_scalar=24
    ),
    "phi": PhiConfig(**TINY, partial_rotary_factor=0.5),  # LayerNorm, biases, half the head rotated
    "phi3": Phi3Config(**TINY, pad_token_id=0, sliding_window=8),
    "starcoder2": Starcoder2Config(**TINY, tie_word_embeddings=False),  # LayerNorm, biases, plain MLP
    "mixtral": MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}
# a llama GGUF as llama.cpp's converter writes it, matrices Q4_1 and embedding and head Q8_0: inputs
# of 256 and 512 split into whole blocks on 8 devices
GGUF = LlamaConfig(**(TINY | dict(hidden_size=256, intermediate_size=512)), tie_word_embeddings=False)
SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Run:
    """One engine: `model` (a CONFIGS name, or "gguf") split over `tp` devices with `kernels`; its
    tokens must be `baseline`'s. `requantize`: re-quantize once served, then generate again; `score`:
    also score SCORED."""

    model: str
    tp: int
    kernels: tuple[tuple[str, str], ...] = ()
    requantize: str | None = None
    score: bool = False

    @property
    def key(self) -> str:
        kernels = "".join(f"+{op}={name}" for op, name in self.kernels)
        return f"{self.model}/{self.tp}{kernels}"

    @property
    def baseline(self) -> str:
        return f"{self.model}/1"


RUNS = [  # the slowest first, so neither of the two workers is left alone with one at the end
    Run("gguf", 2, kernels=(("qmatmul", "pallas"),)),  # interpret mode, each device its weight slices
    Run("llama", 4, kernels=(("paged_attention", "pallas"),)),  # interpret mode, each device its heads
    *(Run("llama", tp, requantize="Q8_0") for tp in (1, 2)),  # re-ISQ of weights split in two
    Run("llama", 4),
    Run("llama", 8, score=True),
    *(Run("gguf", tp) for tp in SIZES),
    *(Run(name, tp) for name in CONFIGS if name != "llama" for tp in SIZES),
]
PROMPTS = [list(range(5, 10)), list(range(40, 51))]  # 5 and 11 tokens: one block, and across one
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
SCORED = list(range(60, 76))  # scored as 6 prompt tokens and 10 continuation tokens
ENGINE = dict(
    kv_cache_tokens=128,
    kv_cache_dtype="float32",
    gemm_dtype="float32",  # the exact settings: every run's products in f32, whatever its kernels
    block_size=8,
    max_model_len=32,
    max_num_seqs=2,
    max_num_batched_tokens=16,
    max_decode_steps=2,
    # LLVM at -O0: a third less compile time, most of a run here; XLA keeps IEEE float semantics
    xla_options={"xla_backend_optimization_level": "0"},
)


def build(out: Path) -> tuple[dict[str, LoadedModel], dict[str, torch.nn.Module]]:
    """Every model written once and loaded once (its weights brought to host memory), and the
    transformers model of each CONFIGS entry."""
    loaded, references = {}, {}
    for name, config in CONFIGS.items():
        folder = out / name
        references[name] = save_tiny_hf_model(config, folder, seed=len(name))
        with torch.no_grad():  # norms (Gemma's are zero-centred) and biases start constant: vary them
            for p in references[name].parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape) * 0.2)
        references[name].save_pretrained(folder)
        save_tiny_tokenizer(folder, config.vocab_size)
        loaded[name] = load_model(str(folder), dtype=jnp.float32)
    folder = out / "gguf"
    folder.mkdir()
    write_tiny_gguf(save_tiny_hf_model(GGUF, folder, seed=5), folder / "tiny.gguf")
    save_tiny_tokenizer(folder, GGUF.vocab_size)
    loaded["gguf"] = load_model(str(folder / "tiny.gguf"), tokenizer=str(folder), dtype=jnp.float32)
    return {k: dataclasses.replace(m, params=jax.device_get(m.params)) for k, m in loaded.items()}, references


def own_copy(params: dict, tp: int) -> dict:
    """A tree of its own for one engine (which stacks and places its leaves in place): host arrays
    for a mesh to split, device arrays for one device."""
    if isinstance(params, dict):
        return {k: own_copy(v, tp) for k, v in params.items()}
    return params if tp > 1 else jax.device_put(params)


def run(run: Run, model: LoadedModel) -> dict:
    """PROMPTS' greedy tokens and their log-probabilities, submitted together (and again after
    `run.requantize`), SCORED's log-probabilities with `run.score`."""
    began = time.perf_counter()
    engine = Engine(
        dataclasses.replace(model, params=own_copy(model.params, run.tp)),
        EngineConfig(**ENGINE, tensor_parallel_size=run.tp),
        kernels=Kernels.from_mapping(dict(run.kernels)),
        dtype=jnp.float32,
    )
    out = greedy(engine) | {"baseline": run.baseline}
    out["kv_spec"] = str(engine.runner.kv.k.sharding.spec) if run.tp > 1 else ""
    params = engine.model.params  # as placed
    out["placed"] = [repr(params["layers"]["attn"][p]["weight"]) for p in ("q_proj", "o_proj")]
    out["placed"].append(repr(params["lm_head"]["weight"]) if "lm_head" in params else "tied")
    if run.requantize:
        engine.requantize(run.requantize)
        out["requantized_tokens"] = greedy(engine)["tokens"]
        out["requantized_weight"] = repr(engine.model.params["layers"]["mlp"]["gate_proj"]["weight"])
    if run.score:
        out["score"] = engine.score(SCORED[:6], SCORED[6:])
    out["seconds"] = round(time.perf_counter() - began, 2)
    print(run.key, out["tokens"], out["seconds"], flush=True, file=sys.stderr)
    return out


def greedy(engine: Engine) -> dict:
    """PROMPTS' greedy tokens and their log-probabilities, submitted together."""
    requests = [engine.add_request(p, GREEDY) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    seqs = [r.seqs[0] for r in requests]
    return {
        "tokens": [s.output_ids for s in seqs],
        "logprobs": [[t.logprob for t in s.logprobs] for s in seqs],
    }


def reference(model: torch.nn.Module, tokens: list[list[int]]) -> dict:
    """transformers' log-probabilities of each prompt's `tokens` after it, and its own greedy choice at
    each of them; SCORED's continuation log-probabilities."""
    out: dict = {"logprobs": [], "argmax": []}
    with torch.no_grad():
        for prompt, gen in zip(PROMPTS, tokens, strict=True):
            logits = model(torch.tensor([prompt + gen[:-1]])).logits[0, len(prompt) - 1 :].double()
            logprobs = torch.log_softmax(logits, -1)
            out["logprobs"].append([float(logprobs[i, t]) for i, t in enumerate(gen)])
            out["argmax"].append(logprobs.argmax(-1).tolist())
        logprobs = torch.log_softmax(model(torch.tensor([SCORED])).logits[0].double(), -1)
    out["score"] = [float(logprobs[i - 1, SCORED[i]]) for i in range(6, len(SCORED))]
    return out


def main(out: Path, only: list[str]) -> int:
    """Every run of RUNS (or those whose key is in `only`), two at a time; then transformers'
    references for the tokens each model generated on one device."""
    began = time.perf_counter()
    models, references = build(out)
    runs = [r for r in RUNS if not only or r.key in only]
    with ThreadPoolExecutor(2) as pool:
        outputs = pool.map(lambda r: run(r, models[r.model]), runs)
        done = dict(zip([r.key for r in runs], outputs, strict=True))
    results = {"runs": done, "transformers": {}}
    for name, model in references.items():
        if f"{name}/1" in done:
            results["transformers"][name] = reference(model, done[f"{name}/1"]["tokens"])
    results["families"] = sorted(CONFIGS)
    results["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
