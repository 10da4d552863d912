"""`quantize`: f32 weights -> `QuantizedTensor` in any format (NumPy, on the host)."""

from __future__ import annotations

import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.quant.formats import FORMATS, parse_format
from jaxrs.quant.hqq import quantize_hqq
from jaxrs.quant.kquants import quantize_kquant
from jaxrs.quant.legacy import quantize_legacy
from jaxrs.quant.tensor import QuantizedTensor, make


def quantize(w: np.ndarray, fmt: str) -> QuantizedTensor:
    """Quantize `w` `[..., out, in]` (rows along `in`, as GGUF stores them) to `fmt`.

    Q4_0..Q8_0 give the same bytes as `gguf.quants.quantize`; K-quants follow llama.cpp's reference
    quantizers; HQQ4/HQQ8 fit HQQ's zero points; F32/F16/BF16 just cast.
    """
    fmt = parse_format(fmt)
    spec = FORMATS[fmt]
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise JaxrsError(f"quantize needs a [..., out, in] weight, got shape {w.shape}")
    if w.shape[-1] % spec.block:
        raise JaxrsError(
            f"{fmt} needs the input dimension to be a multiple of {spec.block}, got shape {w.shape}"
        )
    if spec.family == "float":
        arrays = {"w": w.astype(spec.fields[0].dtype)}
    elif spec.family == "legacy":
        arrays = quantize_legacy(w, fmt)
    elif spec.family == "k":
        arrays = quantize_kquant(w, fmt)
    else:
        arrays = quantize_hqq(w, 4 if fmt == "HQQ4" else 8)
    return make(fmt, w.shape[-2:], arrays)
