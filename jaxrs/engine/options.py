"""The engine's knobs and their allowed values, without importing JAX (the CLI reads its defaults here).

`EngineConfig`'s field defaults are the defaults of the matching `jaxrs run` / `jaxrs serve` flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxrs.lora.config import LoraConfig
from jaxrs.lora.xlora_config import XLoraOptions

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = FLOAT_DTYPES
LAYER_LOOPS = ("scan", "unrolled")
GEMM_DTYPES = ("auto", "float32", "bfloat16")
BLOCK_SIZES = (8, 16, 32)
CPU_KV_CACHE_MB = 512  # the KV pool on a device that reports no memory (CPU), unless sized otherwise...
CPU_KV_CACHE_FREE_SHARE = 0.5  # ...or this share of the host's free memory, if less
# The KV cache's element type on CPU when `kv_cache_dtype` is unset: half of f32's bytes for every key a
# decode step reads, as llama.cpp's default cache (XLA:CPU converts bfloat16 slowly, so float16).
# Accelerators keep the compute dtype (bfloat16 by default). Its cost in perplexity: README, "Defaults".
CPU_KV_CACHE_DTYPE = "float16"
# A GGUF (or GGML) file's quantized tensors stay packed on the device unless asked otherwise (`packed=False`,
# `--dequantize`): its own bits, a fraction of the float weights' memory, and the faster CPU decode.
LOAD_PACKED = True
MAX_WAITING = 256  # queued requests a server takes before answering 429


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. KV memory: `kv_cache_tokens`, else `kv_cache_mb`, else `kv_cache_fraction` of the
    device memory left after the weights (accelerators; on CPU of the host's free memory), else 90% of it
    (accelerators) or `CPU_KV_CACHE_MB`, at most `CPU_KV_CACHE_FREE_SHARE` of the free memory (CPU)."""

    block_size: int = 16  # one of BLOCK_SIZES
    kv_cache_mb: float | None = None
    kv_cache_fraction: float | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None  # default: the model's context length, capped by the pool
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_decode_steps: int = 8  # decode tokens per call when nothing waits
    # KV cache element type (one of KV_CACHE_DTYPES); None: CPU_KV_CACHE_DTYPE on CPU, the compute dtype on
    # accelerators. float32 keeps a CPU cache exact.
    kv_cache_dtype: str | None = None
    prefix_caching: bool = True
    seed: int = 0
    # XLA compiler options for the model steps, over the platform's defaults (runner.STEP_XLA_OPTIONS);
    # an empty value drops a default.
    xla_options: Mapping[str, str] | None = None
    # How the layers run (one of LAYER_LOOPS): "scan" (`lax.scan` over the stacked weights: one layer to
    # compile) or "unrolled" (weights split per layer, see `unstack_layers`). XLA:CPU copies a scanned
    # layer's weights out of the stack before YNNPACK's dots read them; unrolled dots read them in place.
    # On CPU unrolled raised the 32-stream aggregate a little but slowed single-stream decode, and each
    # compiled shape takes several times longer and holds more memory (bench/RESULTS.md, "CPU decode, fifth
    # round: the layer loop"). So scan is the default, unrolled a batch-throughput choice.
    layer_loop: str = "scan"
    # Devices one model is split over (tensor parallelism, `jaxrs.parallel.shardings`): this process's
    # first N, unless the engine is handed its own mesh (data-parallel replicas, several hosts).
    tensor_parallel_size: int = 1
    # Every row's logits the same bits whatever else shares its step, so a seeded request draws the same
    # tokens alone, batched or verified (`batch_invariance`); costs single-stream decode speed (README).
    batch_invariant: bool = False
    # The operands of weight products of 4 or more rows (prompt chunks, decode batches, speculative
    # verifies) on CPU (`matmul_dtype`): "auto" (bfloat16 for packed weights where the CPU has bfloat16
    # dot instructions), "float32" or "bfloat16" (float weights too).
    gemm_dtype: str = "auto"

    lora: LoraConfig | None = None  # LoRA adapters served per request
    xlora: XLoraOptions | None = None  # an X-LoRA model served beside them (requests name it)
    # Speculative decoding (vLLM's keys, see `speculative_config.SpeculativeConfig`): a mapping, a JSON
    # object string, or None for none.
    speculative_config: Any = None


def config_defaults() -> dict[str, Any]:
    """Each `EngineConfig` field's default, by name."""
    return {f.name: f.default for f in dataclasses.fields(EngineConfig)}
