"""A stacked per-layer parameter filled in place, one layer at a time.

Stacking a list of layers holds every layer's host copy and the stacked array at once, and
`jax.device_put` of an ordinary NumPy array copies it once more: three copies of the largest parameter
at the loading peak. Here the stacked array is allocated first and each layer is written into it as it
is read, so its host copies can go before the next layer arrives; the array is 64-byte aligned, which
XLA:CPU needs to use a host buffer as the device array itself (no copy: see `aligned_empty`).

Packed layers in mixed formats (llama.cpp's `_M` mixes) end in the format with the most bits among them,
as `quant.transcode.unify_formats` chooses: the layers written before a richer format turns up are moved
into it then. Packed layers in XLA:CPU's layouts with rows too long for its fused one-row product are
stored as pieces along `in`, each contiguous (`loading.device_layout.cpu_row_spans`, `quant.in_pieces`).
"""

from __future__ import annotations

import numpy as np

from jaxrs.loading.device_layout import cpu_row_spans
from jaxrs.quant import QuantizedTensor
from jaxrs.quant.formats import FORMATS
from jaxrs.quant.in_pieces import InPieces
from jaxrs.quant.transcode import log_unified, to_format

ALIGN = 64  # bytes: XLA:CPU aliases a host buffer aligned to this instead of copying it


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array whose data starts on an `ALIGN`-byte boundary (NumPy's own allocations
    are only 16-byte aligned, so `jax.device_put` on CPU copies them)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _bits(fmt: str) -> float:
    return FORMATS[fmt].bits_per_weight()


class LayerStack:
    """`count` per-layer tensors (NumPy arrays or packed `QuantizedTensor`s) stacked on a new leading
    axis, written with `set(i, tensor)` in any order; `value()` is the stack. Float layers are cast to
    `dtype` as they are written (the cast `jnp.asarray(x, dtype)` makes on the host)."""

    def __init__(self, count: int, dtype: np.dtype, name: str = ""):
        self.count, self.dtype, self.name = count, np.dtype(dtype), name
        self.array: np.ndarray | None = None  # float layers
        self.fmt: str | None = None  # packed layers: their format and logical (out, in),
        self.out_in: tuple[int, int] = (0, 0)
        self.spans: list[tuple[int, int]] = []  # the pieces along `in` they are stored in (one unless split)
        self.pieces: list[dict[str, np.ndarray]] = []  # and each piece's field buffers
        self.formats: list[str | None] = [None] * count  # each packed layer's own format, for the log
        self.written: list[int] = []

    def set(self, i: int, x: np.ndarray | QuantizedTensor) -> None:
        packed = isinstance(x, QuantizedTensor)
        if self.written and packed != (self.fmt is not None):
            raise ValueError("a stacked parameter mixes packed and float tensors")
        if not packed:
            if self.array is None:
                self.array = aligned_empty((self.count, *x.shape), self.dtype)
            self._check(x.shape, self.array.shape[1:])
            self.array[i] = x
        else:
            self.formats[i] = x.fmt
            if self.fmt is None:
                self._allocate(x)
            elif x.fmt != self.fmt:
                if _bits(x.fmt) > _bits(self.fmt):
                    self._move_to(x.fmt)
                else:
                    x = to_format(x, self.fmt)
            self._check(x.shape, (*self.lead, *self.out_in))
            self._write(i, x)
        self.written.append(i)

    @property
    def lead(self) -> tuple[int, ...]:
        """A packed layer's own leading axes (experts)."""
        return next(iter(self.pieces[0].values())).shape[1:-2]

    def _write(self, i: int, x: QuantizedTensor) -> None:
        arrays = {n: np.asarray(v) for n, v in x.arrays.items()}
        for (a, b), fields in zip(self.spans, self.pieces, strict=True):
            for field, part in x.spec.columns(arrays, a, b).items():
                fields[field][i] = part

    def _layer(self, i: int, fmt: str, pieces: list[dict[str, np.ndarray]]) -> QuantizedTensor:
        """Packed layer `i` of `pieces` (buffers in `fmt`), joined."""
        arrays = {n: np.concatenate([fields[n][i] for fields in pieces], axis=-1) for n in pieces[0]}
        return QuantizedTensor(fmt, self.out_in, arrays)

    def _check(self, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(want):  # NumPy would broadcast some of these silently
            raise ValueError(
                f"{self.name or 'a stacked parameter'}: a layer of shape {shape}, the others {want}"
            )

    def value(self) -> np.ndarray | QuantizedTensor:
        """The stacked tensor (every layer must have been written)."""
        if sorted(self.written) != list(range(self.count)):
            raise ValueError(f"{self.name or 'a stacked parameter'}: layers written {sorted(self.written)}")
        if self.fmt is None:
            return self.array
        formats = [f for f in self.formats if f is not None]
        if len(set(formats)) > 1:
            log_unified(self.name, formats, self.fmt)
        out = self.out_in[0]
        pieces = [
            QuantizedTensor(self.fmt, (out, b - a), f)
            for (a, b), f in zip(self.spans, self.pieces, strict=True)
        ]
        return pieces[0] if len(pieces) == 1 else InPieces(pieces)

    def _allocate(self, x: QuantizedTensor) -> None:
        self.fmt, self.out_in = x.fmt, x.out_in
        self.spans = [(0, x.out_in[1])] if x.lead_shape else cpu_row_spans(x.fmt, x.out_in)  # not experts
        self.pieces = [
            {
                n: aligned_empty((self.count, *v.shape), v.dtype)
                for n, v in x.spec.columns(x.arrays, a, b).items()
            }
            for a, b in self.spans
        ]

    def _move_to(self, fmt: str) -> None:
        """Re-encode the layers written so far into `fmt`, which a richer layer has just brought."""
        old_fmt, old_pieces = self.fmt, self.pieces
        self.pieces = []
        for i in self.written:
            qt = to_format(self._layer(i, old_fmt, old_pieces), fmt)
            if not self.pieces:
                self._allocate(qt)
            self._write(i, qt)
