"""`dequantize`: a `QuantizedTensor` -> its weights, in jnp (jittable; the on-device reference).

The arithmetic is `pallas_kernels.dequant`'s, where the kernels that read the same layouts live.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrs.quant.tensor import QuantizedTensor
from pallas_kernels.dequant import dequantize_packed


def dequantize(qt: QuantizedTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The `[..., out, in]` weights `qt` stands for, computed in f32 and returned in `dtype`."""
    return dequantize_packed(qt.arrays, fmt=qt.fmt, out_in=qt.out_in, dtype=dtype)
