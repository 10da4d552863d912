"""`SplitTensor`: a packed weight placed on a tensor-parallel mesh that says which axis the mesh splits.

Inside a traced step a weight is only shapes: its placement is not visible where a kernel is called. A
kernel the compiler cannot partition (a Pallas `qmatmul`) must be run per shard under `shard_map`, with
specs that depend on the split: output rows (column-parallel: each shard its own output slice) or input
columns (row-parallel: each shard a partial sum, all-reduced). `shardings.shard_params` marks every
packed weight it places with its split; the split travels in the pytree's static data, so it survives
`jit`, `lax.scan` over stacked layers and indexing.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from jaxrs.parallel.mesh import TP
from jaxrs.quant.tensor import QuantizedTensor

OUTPUTS, INPUTS = -2, -1  # the split axis, counted from the end (as `shardings.split_axis`)


@jax.tree_util.register_pytree_with_keys_class
class SplitTensor(QuantizedTensor):
    """A `QuantizedTensor` split along `axis` (OUTPUTS, INPUTS, or None: whole on every device). Its
    `out_in` stays the whole weight's; `local` gives the shard's own tensor."""

    __slots__ = ("axis",)

    def __init__(self, qt: QuantizedTensor, axis: int | None):
        super().__init__(qt.fmt, qt.out_in, qt.arrays)
        if axis not in (OUTPUTS, INPUTS, None):
            raise ValueError(f"a packed weight splits on its outputs (-2) or inputs (-1), not {axis}")
        self.axis = axis

    def tree_flatten_with_keys(self):
        children, aux = super().tree_flatten_with_keys()
        return children, (*aux, self.axis)

    def tree_flatten(self):
        children, aux = super().tree_flatten()
        return children, (*aux, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = super().tree_unflatten(aux[:2], children)
        obj.axis = aux[2]
        return obj

    def partition(self, ndim: int) -> P:
        """The PartitionSpec of an array of `ndim` axes laid out like this weight's fields."""
        if self.axis is None:
            return P()
        spec = [None] * ndim
        spec[ndim + self.axis] = TP
        return P(*spec)

    def local(self, arrays: dict, shards: int) -> QuantizedTensor:
        """The plain tensor one of `shards` shards holds, over its own `arrays`."""
        out, inp = self.out_in
        if self.axis == OUTPUTS:
            out //= shards
        elif self.axis == INPUTS:
            inp //= shards
        return QuantizedTensor(self.fmt, (out, inp), arrays)

    def __repr__(self) -> str:
        return f"SplitTensor({self.fmt}, shape={self.shape}, axis={self.axis})"


def split_of(spec: P, ndim: int) -> int | None:
    """Which axis (counted from the end) `spec` splits along the mesh axis, or None."""
    for i, name in enumerate(tuple(spec) + (None,) * (ndim - len(spec))):
        if name == TP:
            return i - ndim
    return None
