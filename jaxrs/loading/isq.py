"""In-situ quantization (ISQ): pack float weights into a quantized format while they load.

Each tensor is quantized as the loader reads it, so peak host memory stays near one tensor beyond the
packed result. The format each tensor takes follows `jaxrs.quant.isq_format` (the requested format, a
32-block fallback for rows it does not divide, Q8_0 for the embedding and head; norms, biases and
routers stay in the model's dtype). Tensors that arrive already packed (a GGUF loaded packed) are left
as they are. A tally of the choices gives the one summary line logged after loading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from jaxrs.quant import IsqChoice, QuantizedTensor, isq_choice, parse_format, quantize
from jaxrs.quant.policy import check_embeddings

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def quantizing_getter(
    get: Getter, fmt: str, *, embeddings: str = "q8_0", tally: Counter[IsqChoice] | None = None
) -> Getter:
    """Wrap a tensor getter so the tensors ISQ packs come back as `QuantizedTensor`s in the format
    `isq_format` gives them; each tensor's choice is counted in `tally`."""
    fmt = parse_format(fmt)  # an unknown name fails here, before any weight is read
    check_embeddings(embeddings)

    def quantized(name: str) -> np.ndarray | QuantizedTensor:
        tensor = get(name)
        if isinstance(tensor, QuantizedTensor):
            choice = IsqChoice(tensor.fmt, "already packed")
        else:
            choice = isq_choice(name, tensor.shape, fmt, embeddings=embeddings)
        if tally is not None:
            tally[choice] += 1
        if choice.fmt is None or isinstance(tensor, QuantizedTensor):
            return tensor
        return quantize(np.asarray(tensor, dtype=np.float32), choice.fmt)

    return quantized


def isq_summary(fmt: str, tally: Counter[IsqChoice]) -> str:
    """One line: how many tensors took which format and why, the requested format first and float last
    (`ISQ Q4_K: 30 tensors Q4_K, 180 Q5_0 (row length not a multiple of 256), 1 Q8_0 (embedding,
    head), 61 float (norms, biases)`)."""
    order = sorted(tally, key=lambda c: (c.fmt is None, c.reason != ""))  # stable: first seen first
    parts = [f"{tally[c]} {c.fmt or 'float'}" + (f" ({c.reason})" if c.reason else "") for c in order]
    if parts:
        count, rest = parts[0].split(" ", 1)
        parts[0] = f"{count} tensors {rest}"
    return f"ISQ {parse_format(fmt)}: {', '.join(parts) or 'no tensors'}"
