"""The operands of the weight products of several rows on CPU (`EngineConfig.gemm_dtype`, `--gemm-dtype`).

A prompt chunk's weight products, a decode batch's and a speculative verify's are GEMMs of several rows,
bound by their multiply-adds. On a CPU with bfloat16 dot instructions (AVX512-BF16, AMX-BF16) XLA:CPU runs
them with bfloat16 operands and f32 accumulation about twice as fast as in f32, and from 4 rows up one
bfloat16 GEMM beats the tile-at-a-time few-row products as well (bench/RESULTS.md, "Prefill products in
bfloat16", "Decode batches in bfloat16"). "auto" takes that for packed weights (a GGUF's quantized
tensors, ISQ): their values carry 8 bits or fewer, and rounding the activations to bfloat16 (8
significant bits) is finer than the 8-bit blocks llama.cpp quantizes them to for the same products. Float
weights keep the compute dtype under "auto" (a float32 checkpoint stays exact); "bfloat16" takes it for
them too, "float32" for neither. Products of one to three rows (single-stream decode) never change
(`qmatmul.gemm_operands`): each row is a fused GEMV that bfloat16 does not speed up (four rows too with a
layer weight of 2-16 M entries, `qmatmul.gemv_rows`). So under "auto" a
request's decode tokens come from f32 products alone and from bfloat16 ones in a batch of 4 or more;
`batch_invariant=True` is the mode for identical results in any batch. Its cost in perplexity and greedy
agreement: README, "Defaults".
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from jaxrs.engine.options import GEMM_DTYPES
from jaxrs.errors import JaxrsError
from jaxrs.ops import Kernels

log = logging.getLogger("jaxrs")

BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names for native bfloat16 dot products
KERNEL = "xla_bf16"  # the `qmatmul` and `matmul` implementations whose GEMMs take bfloat16 operands


@functools.cache
def cpu_has_bf16_dots(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 Linux; elsewhere False, where XLA:CPU would
    emulate bfloat16 and run slower than f32)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return any(flag in flags for flag in BF16_DOT_FLAGS)


def gemm_kernels(choice: str, kernels: Kernels, platform: str) -> Kernels:
    """`kernels` with the `qmatmul` (and, for "bfloat16", `matmul`) op taking bfloat16 GEMM operands as
    `choice` says on `platform`. Under "auto" an op whose kernel was chosen otherwise keeps it; asking for
    "bfloat16" beside another chosen kernel is an error naming it. Off CPU the products already take the
    compute dtype (bfloat16 by default), so nothing changes."""
    if choice not in GEMM_DTYPES:
        raise JaxrsError(f"gemm_dtype must be one of {', '.join(GEMM_DTYPES)}, not {choice!r}")
    if platform != "cpu" or choice == "float32" or (choice == "auto" and not cpu_has_bf16_dots()):
        return kernels
    ops = ("qmatmul",) if choice == "auto" else ("qmatmul", "matmul")
    chosen = dict(kernels.choice)
    taken = [op for op in ops if chosen.get(op, "xla") in ("xla", KERNEL)]
    if choice == "bfloat16" and len(taken) < len(ops):
        op = next(op for op in ops if op not in taken)
        raise JaxrsError(f"gemm_dtype bfloat16 takes the {op!r} kernel {KERNEL!r}; {chosen[op]!r} was chosen")
    if not taken:
        return kernels
    log.info(
        "products of 4 or more rows with %s weights: bfloat16 operands, f32 accumulation "
        "(--gemm-dtype float32 keeps them in f32)",
        " and ".join({"qmatmul": "packed", "matmul": "float"}[op] for op in taken),
    )
    return Kernels.from_mapping({**chosen, **dict.fromkeys(taken, KERNEL)})
