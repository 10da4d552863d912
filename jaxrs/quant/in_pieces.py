"""A packed weight held as pieces along `in`, each piece's arrays contiguous: the CPU layout of long rows.

Why: XLA:CPU fuses a weight's dequantization into a one-row product only while x's row is under 16 KiB
(`pallas_kernels.qmatmul.gemv_spans`), so a longer row (Qwen2.5's down_proj, 4,864 inputs; every
projection of a 4,096-wide model) is multiplied in pieces along `in`. Sliced out of the whole weight, a
piece reads each row's part and skips the rest, at about half the rate of the same piece stored on its
own (bench/RESULTS.md, "Long rows stored in pieces"). So on CPU a stacked layer weight with such rows is
stored as its pieces (`loading.layer_stack`), and the `qmatmul` op multiplies piece by piece.

An `InPieces` stands for the whole `[..., out, in]` weight wherever a `QuantizedTensor` is expected:
its `arrays` are the pieces' fields joined along `in` (a copy, for the readers that want the whole
weight: dequantizing it, saving it, sharding it), while its pytree children are the pieces themselves,
so a layer loop slices each piece and `stacked_layer.scan_packed_in_place` keeps each in its stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxrs.quant.tensor import QuantizedTensor, array_module


@jax.tree_util.register_pytree_with_keys_class
class InPieces(QuantizedTensor):
    """The weight whose columns `spans[i]` are `pieces[i]` (same format, rows and leading axes)."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: Sequence[QuantizedTensor]):
        first = pieces[0]
        if any(p.fmt != first.fmt or p.shape[:-1] != first.shape[:-1] for p in pieces):
            raise ValueError(f"pieces of one weight share a format and every axis but `in`: {pieces}")
        self.fmt = first.fmt
        self.out_in = (first.out_in[0], sum(p.out_in[1] for p in pieces))
        self.pieces = tuple(pieces)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Each piece's columns `(start, end)` along `in`."""
        ends = np.cumsum([p.out_in[1] for p in self.pieces]).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))

    @property
    def arrays(self) -> dict:  # type: ignore[override]
        """The whole weight's fields `[..., out, in // per]`: the pieces' joined along `in` (a copy)."""
        xp = array_module(a for p in self.pieces for a in p.arrays.values())
        return {n: xp.concatenate([p.arrays[n] for p in self.pieces], axis=-1) for n in self.spec.field_names}

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.pieces[0].lead_shape

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def joined(self) -> QuantizedTensor:
        """The weight as one `QuantizedTensor` (its arrays copied whole)."""
        return QuantizedTensor(self.fmt, self.out_in, self.arrays)

    def tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.SequenceKey(i), p) for i, p in enumerate(self.pieces))
        return children, (self.fmt, self.out_in)

    def tree_flatten(self):
        return self.pieces, (self.fmt, self.out_in)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # no validation: transformations unflatten with placeholders
        obj = object.__new__(cls)
        (obj.fmt, obj.out_in), obj.pieces = aux, tuple(children)
        return obj

    def __repr__(self) -> str:
        return f"InPieces({self.fmt}, shape={self.shape}, spans={self.spans})"


def split_in(qt: QuantizedTensor, spans: Sequence[tuple[int, int]]) -> InPieces:
    """`qt` as its pieces over `spans` (whole blocks of its format), each piece's arrays a contiguous copy."""
    xp = array_module(qt.arrays.values())
    pieces = [
        QuantizedTensor(
            qt.fmt,
            (qt.out_in[0], b - a),
            {n: xp.array(v) for n, v in qt.spec.columns(qt.arrays, a, b).items()},
        )
        for a, b in spans
    ]
    return InPieces(pieces)
