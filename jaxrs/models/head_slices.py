"""The logits of a packed output head computed a vocabulary slice at a time, on CPU.

XLA:CPU dequantizes a packed weight into a dense buffer before its dot: for the head that buffer is the
whole vocabulary in f32 (108 MiB for SmolLM2's 49,152 x 576, 519 MiB for Qwen2.5's 151,936 x 896), the
largest temporary of every step and most of a serving process's peak above its weights. In slices of at
most `SLICE_BYTES` under `lax.map` the step reads the same bytes and keeps one slice's buffer. The XLA
product of a few rows (`jaxrs.ops.takes_row_tiles`) reads the head a tile at a time by itself: it takes the
head whole, as one loop of tiles rather than a loop of slices each with its own tiles and ragged tail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrs.ops import takes_row_tiles
from jaxrs.quant import QuantizedTensor

SLICE_BYTES = 8 * 2**20  # f32 bytes of the dequantized head slice a step holds at once


def slice_count(out: int, inp: int, limit: int | None = None) -> int:
    """The fewest equal row slices of an `[out, inp]` head whose f32 form fits `limit` (1: no need), or 1
    when `out` has no divisor near that count (a prime vocabulary: one slice per row would crawl)."""
    need = -(-out * inp * 4 // (limit or SLICE_BYTES))
    if need <= 1:
        return 1
    for n in range(need, 4 * need + 1):
        if out % n == 0:
            return n
    return 1


def head_in_slices(
    qmatmul: Callable[[jax.Array, QuantizedTensor], jax.Array], hidden: jax.Array, head: QuantizedTensor
) -> jax.Array:
    """`qmatmul(hidden, head)` in f32, a slice of the head's rows at a time when the step runs on CPU."""
    out, inp = head.out_in
    rows = math.prod(hidden.shape[:-1])
    whole = takes_row_tiles(qmatmul, rows, head.fmt, head.out_in)  # its tiles never hold the head
    n = slice_count(out, inp) if jax.default_backend() == "cpu" and not head.lead_shape and not whole else 1
    if n == 1:
        return qmatmul(hidden, head).astype(jnp.float32)
    rows = out // n
    parts = QuantizedTensor(
        head.fmt, (rows, inp), {k: a.reshape(n, rows, *a.shape[1:]) for k, a in head.arrays.items()}
    )
    # lax.map hands the body one slice: [rows, in // per] arrays, the logical shape (rows, in)
    ys = jax.lax.map(lambda part: qmatmul(hidden, part).astype(jnp.float32), parts)  # [n, ..., rows]
    return jnp.moveaxis(ys, 0, -2).reshape(*hidden.shape[:-1], out)
