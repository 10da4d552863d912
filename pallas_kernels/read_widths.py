"""Decode attention reads only the block-table columns its longest row needs.

The dense XLA attention gathers every page of its block table, converts it to f32 and lays it out for
the dots: a row of 136 keys in a 16-block table (256 keys) would gather nearly twice the keys it sees.
Those gathers were a tenth (packed) to a fifth (f32) of a 32-row demo step (bench/RESULTS.md, "CPU
decode, seventh round"). Here the table is cut, each step, to the narrowest of a few static widths that
covers the longest row: a `lax.switch` over the same attention at each width, so nothing is compiled
per context length (from `runner.WIDEST_FROM_KEYS` keys the engine sends a decode its widest table), the
keys past a row's context stay masked as before, and the result is the whole table's (the columns
dropped hold no key any row sees).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# How many widths a table is read at per octave of its width, at least MIN_READ_STEP blocks apart: a row
# needing n blocks reads under a quarter of an octave more (at most 25% more keys, about 12% on average),
# the granularity that eight even fractions of a power-of-two table gave in its top octave, now for a table
# of any width, so the engine sends a decode over a long context its widest table (`runner.WIDEST_FROM_KEYS`)
# and compiles no decode shape per context length. Each width is one more attention in the step's switch,
# about 0.2 s of compile time and 1 MiB of resident code a compiled step (bench/RESULTS.md, "One decode width
# from 512 keys"). 0 reads whole tables. Read when tracing, so a benchmark may set it between compiles.
STEPS_PER_OCTAVE = 4
# Two blocks (32 keys at the default block size) at least between widths: finer steps over a short context
# save a few keys for one more branch each.
MIN_READ_STEP = 2
# Every decode over a table of at least NARROW_MIN_KEYS keys narrows, one row too. The rule before (from two
# rows and 2,048 gathered keys) was measured while the switch's result reached o_proj as `[rows, 1, heads,
# head_dim]`: one row's GEMV then read it through that shape, index by index (o_proj 4-7x q_proj's time), so
# one row read its table whole. The switch now returns each branch's output flat (`[rows, heads *
# head_dim]`), the shape o_proj reads, and the demo's one-row step took 0.89-0.96x the time at 40-520 keys
# narrowed (128- to 768-key tables), its 2-8-row steps 0.88x over 128-key tables and 0.94-1.02x over
# 256-key ones; Gemma-3-270M's and Qwen2.5-0.5B's 0.97-1.03x (bench/RESULTS.md, "One decode row reads only
# the keys it needs"). Smaller tables (the narrowest bucket at block size 8, small test models' limits) are
# read whole: a switch of attentions multiplies a decode step's compile time.
NARROW_MIN_KEYS = 128


def narrows(table_keys: int) -> bool:
    """Whether a decode over tables of `table_keys` keys reads the narrowest width its rows need
    (`read_narrowest`), not the whole table."""
    return STEPS_PER_OCTAVE > 0 and table_keys >= NARROW_MIN_KEYS


def read_widths(width: int, per_octave: int | None = None) -> list[int]:
    """The widths, in blocks, a `width`-block table may be read at: `per_octave` (default
    `STEPS_PER_OCTAVE`) even steps across each octave, at least `MIN_READ_STEP` blocks apart (2, 4, 6, 8,
    10, 12, 14, 16, 20, ... at 4), ending at the whole table."""
    per_octave = STEPS_PER_OCTAVE if per_octave is None else per_octave
    widths, w = [], MIN_READ_STEP
    while per_octave > 0 and w < width:
        widths.append(w)
        w += max(MIN_READ_STEP, (1 << (w.bit_length() - 1)) // per_octave)  # the octave's start / per_octave
    return [*widths, width]


def read_narrowest(
    attend: Callable[[jax.Array], jax.Array],
    block_tables: jax.Array,
    context_lens: jax.Array,
    block_size: int,
    per_octave: int | None = None,
) -> jax.Array:
    """`attend(tables)` on the first columns of `block_tables` [B, W]: the narrowest of `read_widths(W)`
    holding every row's `context_lens` keys, chosen at run time. Each branch returns its result flat,
    `[B, -1]`, the shape a product after it reads (see `narrows`)."""
    widths = read_widths(block_tables.shape[1], per_octave)
    if len(widths) == 1:
        return attend(block_tables)
    needed = (jnp.max(context_lens).astype(jnp.int32) + block_size - 1) // block_size
    index = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) < needed)  # the widths too narrow for it
    shape = jax.eval_shape(attend, block_tables).shape
    branches = [lambda tables, w=w: attend(tables[:, :w]).reshape(shape[0], -1) for w in widths]
    return lax.switch(index, branches, block_tables).reshape(shape)
