"""`QuantizedTensor`: a packed weight as a JAX pytree, so it jits, scans and shards like an array."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxrs.errors import JaxrsError
from jaxrs.quant.formats import FORMATS, FormatSpec, parse_format


@jax.tree_util.register_pytree_with_keys_class
class QuantizedTensor:
    """A `[..., out, in]` weight in format `fmt`, as the named arrays of its layout (see `formats`).

    Leaves: one array per field, each `[..., out, in // per]`, in the format's field order. Static
    (aux data): the format name and the logical `(out, in)`. Leading axes (stacked layers, experts)
    live only in the leaves, so `lax.scan` over a stacked tensor hands the body per-layer tensors.
    Leaves may be NumPy (host, as built by `quantize`/`from_gguf_bytes`) or JAX arrays
    (`jax.device_put(qt)` moves them all).
    """

    __slots__ = ("fmt", "out_in", "arrays")

    def __init__(self, fmt: str, out_in: tuple[int, int], arrays: Mapping[str, Any]):
        self.fmt = fmt
        self.out_in = (int(out_in[0]), int(out_in[1]))
        self.arrays = dict(arrays)

    # ---- pytree ----
    def tree_flatten_with_keys(self):
        names = FORMATS[self.fmt].field_names
        children = tuple((jax.tree_util.DictKey(n), self.arrays[n]) for n in names)
        return children, (self.fmt, self.out_in)

    def tree_flatten(self):
        names = FORMATS[self.fmt].field_names
        return tuple(self.arrays[n] for n in names), (self.fmt, self.out_in)

    @classmethod
    def tree_unflatten(cls, aux, children):
        fmt, out_in = aux
        # no validation: transformations unflatten with placeholders (None, sentinels, batched axes)
        obj = object.__new__(cls)
        obj.fmt, obj.out_in = fmt, out_in
        obj.arrays = dict(zip(FORMATS[fmt].field_names, children, strict=True))
        return obj

    # ---- shape ----
    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.fmt]

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.spec.lead_shape(self.arrays)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape `[..., out, in]` of the weight this stands for."""
        return (*self.lead_shape, *self.out_in)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in self.arrays.values()))

    def __getitem__(self, index) -> QuantizedTensor:
        """Index the leading (stacked) axes: `qt[layer]`, `qt[1:3]`; never the `out`/`in` axes."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.lead_shape) or any(i is Ellipsis or i is None for i in index):
            raise IndexError(f"only the leading axes {self.lead_shape} of a QuantizedTensor can be indexed")
        return jax.tree.map(lambda a: a[index], self)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.fmt}, shape={self.shape})"


def make(fmt: str, out_in: tuple[int, int], arrays: Mapping[str, Any]) -> QuantizedTensor:
    """A checked `QuantizedTensor`: every field present with the shape and dtype of the layout."""
    fmt = parse_format(fmt)
    spec = FORMATS[fmt]
    out, in_ = out_in
    if in_ % spec.block:
        raise JaxrsError(f"{fmt} needs the input dimension to be a multiple of {spec.block}, got {in_}")
    lead = None
    for f in spec.fields:
        if f.name not in arrays:
            raise JaxrsError(f"{fmt} tensor is missing array {f.name!r}")
        a = arrays[f.name]
        if lead is None:
            lead = tuple(a.shape[:-2])
        want = (*lead, out, in_ // f.per)
        if tuple(a.shape) != want or np.dtype(a.dtype) != f.dtype:
            raise JaxrsError(
                f"{fmt} array {f.name!r}: expected {want} {f.dtype}, got {tuple(a.shape)} {np.dtype(a.dtype)}"
            )
    return QuantizedTensor(fmt, (out, in_), arrays)


def stack(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Stack same-format, same-shape tensors along a new leading axis (per-layer -> `[L, out, in]`)."""
    if not tensors:
        raise JaxrsError("stack needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        if t.fmt != first.fmt or t.shape != first.shape:
            raise JaxrsError(f"cannot stack {t!r} onto {first!r}: formats and shapes must match")
    lib = array_module(a for t in tensors for a in t.arrays.values())
    arrays = {n: lib.stack([t.arrays[n] for t in tensors]) for n in first.spec.field_names}
    return QuantizedTensor(first.fmt, first.out_in, arrays)


def array_module(arrays: Iterable[Any]):
    """NumPy when every array is a host array (a packed tensor still being built), else `jax.numpy`."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jax.numpy


def tree_nbytes(tree: Any) -> int:
    """Bytes held by a pytree's arrays (a `QuantizedTensor` counts its packed fields): what a parameter
    tree occupies on the device, to compare formats and file sizes."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))
