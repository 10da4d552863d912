"""Decode attention reads only the block-table columns its longest row needs.

The dense XLA attention gathers every page of its block table, converts it to f32 and lays it out for
the dots, and the engine's tables come in power-of-two width buckets: a row of 136 keys in a 16-block
table (256 keys) gathers nearly twice the keys it sees, as does one of 520 keys in a 64-block table.
Those gathers were a tenth (packed) to a fifth (f32) of a 32-row demo step (bench/RESULTS.md, "CPU
decode, seventh round"). Here the table is cut, each step, to the narrowest of a few static widths that
covers the longest row: a `lax.switch` over the same attention at each width, so nothing is compiled
per context length, the keys past a row's context stay masked as before, and the result is the whole
table's (the columns dropped hold no key any row sees).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# How many static widths a table is read at (even fractions of its width, at least one block apart);
# 1 reads the whole table. Read when tracing, so a benchmark may set it between compiles.
READ_WIDTHS = 8
# Every decode over a table of at least NARROW_MIN_KEYS keys narrows, one row too. The rule before (from two
# rows and 2,048 gathered keys) was measured while the switch's result reached o_proj as `[rows, 1, heads,
# head_dim]`: one row's GEMV then read it through that shape, index by index (o_proj 4-7x q_proj's time), so
# one row read its table whole. The switch now returns each branch's output flat (`[rows, heads *
# head_dim]`), the shape o_proj reads, and the demo's one-row step took 0.89-0.96x the time at 40-520 keys
# narrowed (128- to 768-key tables), its 2-8-row steps 0.88x over 128-key tables and 0.94-1.02x over
# 256-key ones; Gemma-3-270M's and Qwen2.5-0.5B's 0.97-1.03x (bench/RESULTS.md, "One decode row reads only
# the keys it needs"). Smaller tables, which only small test models' limits give, are read whole: a switch
# of up to eight attentions costs each decode step twice its compile time.
NARROW_MIN_KEYS = 128


def narrows(table_keys: int) -> bool:
    """Whether a decode over tables of `table_keys` keys reads the narrowest width its rows need
    (`read_narrowest`), not the whole table."""
    return READ_WIDTHS > 1 and table_keys >= NARROW_MIN_KEYS


def read_widths(width: int, count: int | None = None) -> list[int]:
    """The widths, in blocks, a `width`-block table may be read at: `count` (default `READ_WIDTHS`)
    even fractions of it, rounded up to whole blocks, ending at the whole table."""
    count = READ_WIDTHS if count is None else count
    steps = max(1, min(width, count))
    return sorted({-(-width * i // steps) for i in range(1, steps + 1)})


def read_narrowest(
    attend: Callable[[jax.Array], jax.Array],
    block_tables: jax.Array,
    context_lens: jax.Array,
    block_size: int,
    count: int | None = None,
) -> jax.Array:
    """`attend(tables)` on the first columns of `block_tables` [B, W]: the narrowest of `read_widths(W)`
    holding every row's `context_lens` keys, chosen at run time. Each branch returns its result flat,
    `[B, -1]`, the shape a product after it reads (see `narrows`)."""
    widths = read_widths(block_tables.shape[1], count)
    if len(widths) == 1:
        return attend(block_tables)
    needed = (jnp.max(context_lens).astype(jnp.int32) + block_size - 1) // block_size
    index = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) < needed)  # the widths too narrow for it
    shape = jax.eval_shape(attend, block_tables).shape
    branches = [lambda tables, w=w: attend(tables[:, :w]).reshape(shape[0], -1) for w in widths]
    return lax.switch(index, branches, block_tables).reshape(shape)
