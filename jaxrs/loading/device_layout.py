"""The layout packed weights take on the device they load onto: one rule for every way a weight is packed.

On XLA:CPU the nibble and bit-plane formats dequantize several times slower than one byte a weight, so
a packed tensor moves, exactly, into the CPU layout `quant.transcode.CPU_LAYOUT` gives it (Q4_0, Q5_0,
Q8_0 -> Q8F; Q4_1, Q5_1, Q4_K, Q5_K -> U8M), whatever packed it: a packed GGUF read (row by row, inside
the GGUF reader), ISQ while loading (`isq=`, a speculative draft's `isq`, runtime re-ISQ, which loads
the model again with ISQ), or a folder `jaxrs quantize` wrote. Other backends keep the formats, and so
does `load_model(device_layout=False)`, which `jaxrs quantize` uses so its folders hold the formats
themselves. The bytes reported after loading are the tensors' bytes as held (`tree_nbytes`), and one
log line counts the tensors moved.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxrs.quant.tensor import QuantizedTensor
from jaxrs.quant.transcode import CPU_LAYOUT, cpu_layout

log = logging.getLogger("jaxrs")

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def relays_packed_weights(device_layout: bool = True) -> bool:
    """Whether packed weights loaded now move into the CPU layout: on XLA:CPU, unless `device_layout`
    is False (keep each tensor in the format it was quantized to or stored in)."""
    return device_layout and jax.default_backend() == "cpu"


def count_moves(formats: Iterable[str], moved: Counter[str]) -> None:
    """Count in `moved` (by `"Q4_1 -> U8M"`) the tensors of `formats` that the CPU layout moves."""
    for fmt in formats:
        if fmt in CPU_LAYOUT:
            moved[f"{fmt} -> {CPU_LAYOUT[fmt]}"] += 1


def relaid_getter(get: Getter, moved: Counter[str]) -> Getter:
    """`get` whose packed tensors come back in the CPU layout (host arrays, whole tensors: what ISQ
    returns), each move counted in `moved`; float tensors and tensors already there pass through."""

    def relaid(name: str) -> np.ndarray | QuantizedTensor:
        tensor = get(name)
        if not isinstance(tensor, QuantizedTensor):
            return tensor
        count_moves([tensor.fmt], moved)
        return cpu_layout(tensor)

    return relaid


def relaid_tree(params: dict, moved: Counter[str]) -> dict:
    """`params` (device arrays, e.g. a pre-quantized folder's) with each packed tensor the CPU layout
    moves read to the host, moved, and placed on the device again; the rest as it was."""

    def relaid(leaf):
        if not isinstance(leaf, QuantizedTensor) or leaf.fmt not in CPU_LAYOUT:
            return leaf
        count_moves([leaf.fmt], moved)
        return jax.device_put(cpu_layout(jax.device_get(leaf)))

    return jax.tree.map(relaid, params, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def log_moves(moved: Counter[str]) -> None:
    """One line naming the moves made, if any."""
    if moved:
        log.info(
            "packed weights in the exact layouts XLA:CPU reads fastest: %s",
            ", ".join(f"{k} ({n} tensors)" for k, n in moved.items()),
        )
