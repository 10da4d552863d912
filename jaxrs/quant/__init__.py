"""Quantized weights that stay packed on the device.

- `formats`: the format names, GGUF types and structure-of-arrays layouts (the layouts and the jittable
  dequantization are `pallas_kernels`', which the kernels read without jaxrs); `parse_format`.
- `QuantizedTensor` (a pytree), `stack`.
- `from_gguf_bytes` / `to_gguf_bytes`: GGUF blocks <-> our layout (NumPy).
- `dequantize` (jnp, jittable), `quantize` (NumPy, every format), `isq_format` (ISQ rule: the format
  each tensor takes, with a 32-block fallback).

Matmuls against packed weights: `pallas_kernels.qmatmul` (op `qmatmul` in `jaxrs.ops`).
"""

from jaxrs.quant.dequant import dequantize
from jaxrs.quant.formats import FORMATS, QUANTIZED_FORMATS, FormatSpec, parse_format
from jaxrs.quant.gguf_codec import from_gguf_bytes, to_gguf_bytes
from jaxrs.quant.policy import IsqChoice, isq_choice, isq_format
from jaxrs.quant.quantize import quantize
from jaxrs.quant.tensor import QuantizedTensor, stack

__all__ = [
    "FORMATS",
    "QUANTIZED_FORMATS",
    "FormatSpec",
    "IsqChoice",
    "QuantizedTensor",
    "dequantize",
    "from_gguf_bytes",
    "isq_choice",
    "isq_format",
    "parse_format",
    "quantize",
    "stack",
    "to_gguf_bytes",
]
