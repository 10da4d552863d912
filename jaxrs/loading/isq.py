"""In-situ quantization (ISQ): pack float weights into a quantized format while they load.

Each tensor is quantized as the loader reads it, so peak host memory stays near one tensor beyond the
packed result. Which tensors are packed follows `jaxrs.quant.should_quantize` (matrices only; norms,
biases, routers and, by default, the embedding and output head stay in the model's dtype). Tensors
that arrive already packed (a GGUF loaded packed) are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxrs.quant import QuantizedTensor, parse_format, quantize, should_quantize

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def quantizing_getter(get: Getter, fmt: str, *, embeddings: bool = False) -> Getter:
    """Wrap a tensor getter so the tensors ISQ packs come back as `QuantizedTensor`s in `fmt`."""
    fmt = parse_format(fmt)  # an unknown name fails here, before any weight is read

    def quantized(name: str) -> np.ndarray | QuantizedTensor:
        tensor = get(name)
        if isinstance(tensor, QuantizedTensor) or not should_quantize(
            name, tensor.shape, fmt, embeddings=embeddings
        ):
            return tensor
        return quantize(np.asarray(tensor, dtype=np.float32), fmt)

    return quantized
