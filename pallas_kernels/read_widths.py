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
# Decode narrows from this many keys gathered a layer (rows x table keys): below it the switch and the
# fusions it splits cost more than the keys it saves. One row at a 1,024-key table took 8% more CPU time a
# step narrowed, 32 rows at 256 and 1,024 keys 13% and 21% less (bench/RESULTS.md, "CPU decode, seventh
# round").
NARROW_MIN_KEYS = 2048
# And from this many rows: one row reads its whole table. Its products are XLA's one-row GEMVs, and the one
# reading the switch's result (o_proj) ran 4-7x as long as q_proj of the same size after it; reading the
# whole table cost less even at twice the keys: one demo row took 10% and 15% less CPU time a step whole
# at 1,024 and 4,000 keys (2,048- and 8,192-key tables), where two rows at 1,024 keys took twice as long
# whole (bench/RESULTS.md, "Decode attention on XLA:CPU: the formulations, and one row reads its table
# whole").
NARROW_MIN_ROWS = 2


def worth_narrowing(rows: int, table_keys: int) -> bool:
    """Whether a decode of `rows` rows over tables of `table_keys` keys reads the narrowest width."""
    return READ_WIDTHS > 1 and rows >= NARROW_MIN_ROWS and rows * table_keys >= NARROW_MIN_KEYS


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
    holding every row's `context_lens` keys, chosen at run time."""
    widths = read_widths(block_tables.shape[1], count)
    if len(widths) == 1:
        return attend(block_tables)
    needed = (jnp.max(context_lens).astype(jnp.int32) + block_size - 1) // block_size
    index = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) < needed)  # the widths too narrow for it
    branches = [lambda tables, w=w: attend(tables[:, :w]) for w in widths]
    return lax.switch(index, branches, block_tables)
