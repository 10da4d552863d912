"""A stacked per-layer parameter filled in place, one layer at a time.

Stacking a list of layers holds every layer's host copy and the stacked array at once, and
`jax.device_put` of an ordinary NumPy array copies it once more: three copies of the largest parameter
at the loading peak. Here the stacked array is allocated first and each layer is written into it as it
is read, so its host copies can go before the next layer arrives; the array is 64-byte aligned, which
XLA:CPU needs to use a host buffer as the device array itself (no copy: see `aligned_empty`).

Packed layers in mixed formats (llama.cpp's `_M` mixes) end in the format with the most bits among them,
as `quant.transcode.unify_formats` chooses: the layers written before a richer format turns up are moved
into it then.
"""

from __future__ import annotations

import numpy as np

from jaxrs.quant import QuantizedTensor
from jaxrs.quant.formats import FORMATS
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
        self.fmt: str | None = None  # packed layers: their format, field buffers and logical (out, in)
        self.fields: dict[str, np.ndarray] = {}
        self.out_in: tuple[int, int] = (0, 0)
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
            self._check(x.shape, (*self.fields[next(iter(self.fields))].shape[1:-2], *self.out_in))
            for field, buffer in self.fields.items():
                buffer[i] = np.asarray(x.arrays[field])
        self.written.append(i)

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
        return QuantizedTensor(self.fmt, self.out_in, self.fields)

    def _allocate(self, x: QuantizedTensor) -> None:
        self.fmt, self.out_in = x.fmt, x.out_in
        self.fields = {name: aligned_empty((self.count, *a.shape), a.dtype) for name, a in x.arrays.items()}

    def _move_to(self, fmt: str) -> None:
        """Re-encode the layers written so far into `fmt`, which a richer layer has just brought."""
        old_fmt, old = self.fmt, self.fields
        self.fields = {}
        for i in self.written:
            qt = to_format(QuantizedTensor(old_fmt, self.out_in, {n: a[i] for n, a in old.items()}), fmt)
            if not self.fields:
                self._allocate(qt)
            for field, buffer in self.fields.items():
                buffer[i] = np.asarray(qt.arrays[field])
