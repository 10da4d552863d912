"""The layout packed weights take on the device they load onto: one rule for every way a weight is packed.

On XLA:CPU the nibble and bit-plane formats dequantize several times slower than one byte a weight, so
a packed tensor moves, exactly, into the CPU layout `quant.transcode.CPU_LAYOUT` gives it (Q4_0, Q5_0,
Q8_0 -> Q8F; Q4_1, Q5_1, Q4_K, Q5_K -> U8M), whatever packed it: a packed GGUF read (row by row, inside
the GGUF reader), ISQ while loading (`isq=`, a speculative draft's `isq`, runtime re-ISQ, which loads
the model again with ISQ), or a folder `jaxrs quantize` wrote. Other backends keep the formats, and so
does `load_model(device_layout=False)`, which `jaxrs quantize` uses so its folders hold the formats
themselves. The bytes reported after loading are the tensors' bytes as held (`tree_nbytes`), and one
log line counts the tensors moved. A stacked layer weight in those layers whose rows XLA:CPU multiplies
in pieces is stored in those pieces (`cpu_row_spans`, `quant.in_pieces`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxrs.quant.in_pieces import split_in
from jaxrs.quant.tensor import QuantizedTensor
from jaxrs.quant.transcode import CPU_LAYOUT, cpu_layout
from pallas_kernels.formats import LAYOUTS
from pallas_kernels.qmatmul import gemv_spans

log = logging.getLogger("jaxrs")

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def relays_packed_weights(device_layout: bool = True) -> bool:
    """Whether packed weights loaded now move into the CPU layout: on XLA:CPU, unless `device_layout`
    is False (keep each tensor in the format it was quantized to or stored in)."""
    return device_layout and jax.default_backend() == "cpu"


# Stacked layer weights in the CPU layouts are stored in the pieces along `in` that XLA:CPU's one-row
# product takes them in (`cpu_row_spans`): sliced out of whole rows, the pieces ran at half the rate
# (bench/RESULTS.md, "Long rows stored in pieces"). Read when a stack is allocated.
SPLIT_LONG_ROWS = True


def cpu_row_spans(fmt: str, out_in: tuple[int, int]) -> list[tuple[int, int]]:
    """The spans along `in` a stacked packed weight is stored in: for XLA:CPU's layouts (byte codes, the
    formats `cpu_layout` gives), those of a one-row f32 product (`qmatmul.gemv_spans`); else one."""
    if SPLIT_LONG_ROWS and jax.default_backend() == "cpu" and fmt in CPU_LAYOUT.values():
        return gemv_spans(out_in[1], LAYOUTS[fmt].block)
    return [(0, out_in[1])]


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
        moved_leaf = cpu_layout(jax.device_get(leaf))
        spans = cpu_row_spans(moved_leaf.fmt, moved_leaf.out_in)
        if len(spans) > 1 and len(moved_leaf.lead_shape) == 1:  # a stacked layer weight
            moved_leaf = split_in(moved_leaf, spans)
        return jax.device_put(moved_leaf)

    return jax.tree.map(relaid, params, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def log_moves(moved: Counter[str]) -> None:
    """One line naming the moves made, if any."""
    if moved:
        log.info(
            "packed weights in the exact layouts XLA:CPU reads fastest: %s",
            ", ".join(f"{k} ({n} tensors)" for k, n in moved.items()),
        )
