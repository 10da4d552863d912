"""One layer of a stacked packed weight, left in its stack until a product reads it.

Why: under `lax.scan` every layer's weight is a dynamic slice of the stacked `[L, out, in]` arrays. A
one-row product fuses that slice into itself, but XLA:CPU copies the slice out whole before a loop takes
it as an operand, and the few-row products on CPU loop over tiles of the weight (`qmatmul_xla`): one
copy of every projection a layer, 1.11-1.42x the CPU time of a 4-32-row decode step on the demo,
Gemma-3-270M and Qwen2.5-0.5B (bench/RESULTS.md, "Few-row products, third round"). A
`StackedLayer` stands for layer `layer` of `stack` wherever a `QuantizedTensor` is expected (its
`arrays` are the layer's own, sliced when read), while the `qmatmul` op hands the XLA product the
stack and the index, so that each tile is sliced straight out of the stack.

`scan_packed_in_place(tree, keep)` splits a stacked parameter tree into the part the scan slices and the
packed weights kept whole, and puts the two back together per layer inside the scan body. The decoder
keeps only the weights whose product takes the few-row tiles at the step's row count: a one-row product
and a prefill chunk's product read the scan's slice as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from jaxrs.quant.tensor import QuantizedTensor

CPU_IN_PLACE = True  # the layer loop on CPU keeps packed weights in their stacks (`scan_packed_in_place`)


@jax.tree_util.register_pytree_with_keys_class
class StackedLayer(QuantizedTensor):
    """Layer `layer` (a traced index) of the stacked `QuantizedTensor` `stack`, not sliced out yet."""

    __slots__ = ("stack", "layer")

    def __init__(self, stack: QuantizedTensor, layer: jax.Array):
        if len(stack.lead_shape) != 1:
            raise ValueError(f"a stacked layer needs one leading (layer) axis, not {stack.lead_shape}")
        self.fmt, self.out_in = stack.fmt, stack.out_in
        self.stack, self.layer = stack, layer

    @property
    def arrays(self) -> dict[str, jax.Array]:  # type: ignore[override]
        """The layer's own fields `[out, in // per]` (a dynamic slice of the stack each)."""
        return {
            n: lax.dynamic_index_in_dim(a, self.layer, keepdims=False) for n, a in self.stack.arrays.items()
        }

    def tree_flatten_with_keys(self):
        children, aux = self.stack.tree_flatten_with_keys()
        return (*children, (jax.tree_util.GetAttrKey("layer"), self.layer)), aux

    def tree_flatten(self):
        children, aux = self.stack.tree_flatten()
        return (*children, self.layer), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        fmt, out_in = aux
        obj = object.__new__(cls)
        obj.fmt, obj.out_in, obj.layer = fmt, out_in, children[-1]
        obj.stack = QuantizedTensor.tree_unflatten(aux, children[:-1])
        return obj

    def __repr__(self) -> str:
        return f"StackedLayer({self.fmt}, shape={self.out_in}, of {self.stack.lead_shape[0]} layers)"


def scan_packed_in_place(
    stacked: Any, keep: Callable[[QuantizedTensor], bool] = lambda qt: True
) -> tuple[Any, Callable[[Any, jax.Array], Any]]:
    """(the tree the scan slices: `stacked` without the packed weights that `keep` picks, `layer_of(sliced,
    index)`: one layer's tree, the scanned slice with each kept weight put back as its `StackedLayer`)."""

    def is_kept(leaf: Any) -> bool:
        return type(leaf) is QuantizedTensor and len(leaf.lead_shape) == 1 and keep(leaf)

    leaves, treedef = jax.tree.flatten(stacked, is_leaf=is_kept)
    kept = {i: leaf for i, leaf in enumerate(leaves) if is_kept(leaf)}
    scanned = [None if i in kept else leaf for i, leaf in enumerate(leaves)]

    def layer_of(sliced: list, index: jax.Array) -> Any:
        return treedef.unflatten(
            [StackedLayer(kept[i], index) if i in kept else leaf for i, leaf in enumerate(sliced)]
        )

    return scanned, layer_of
