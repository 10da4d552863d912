"""Decode attention reads only the table columns the longest row needs, with the whole table's result."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import read_widths as rw
from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.read_widths import read_widths
from tests.test_paged_attention import make_inputs


def test_read_widths_are_even_fractions_ending_at_the_table() -> None:
    assert read_widths(8, 8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert read_widths(16, 8) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert read_widths(64, 4) == [16, 32, 48, 64]
    assert read_widths(3, 8) == [1, 2, 3]
    assert read_widths(16, 1) == [16]
    assert read_widths(10, 4) == [3, 5, 8, 10]


@pytest.mark.parametrize("lengths", [[3, 20, 0, 9], [64, 1], [17]])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_narrowed_decode_equals_the_whole_table(lengths: list[int], sliding_window: int | None) -> None:
    """Rows of several lengths (0: a padding row) over an 8-block table whose unused columns are junk."""
    starts = [max(n - 1, 0) for n in lengths]
    new = [1 if n else 0 for n in lengths]
    inputs = make_inputs(
        block_size=8, group=3, starts=starts, new_tokens=new, q_len=1, dtype=jnp.float32, table_width=8
    )
    options = dict(scale=0.2, sliding_window=sliding_window)
    whole = paged_attention_xla(**inputs, **options, narrowed=False)
    narrowed = paged_attention_xla(**inputs, **options, narrowed=True)
    np.testing.assert_allclose(np.asarray(narrowed), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_columns_past_the_longest_row_are_not_read() -> None:
    """A NaN page behind a column no row reaches poisons the whole-table read (0 x NaN in the weighted
    sum of values) and not the narrowed one."""
    inputs = make_inputs(
        block_size=8, group=2, starts=[10, 4], new_tokens=[1, 1], q_len=1, dtype=jnp.float32, table_width=8
    )
    poisoned = inputs["k_cache"].shape[1]  # a new page at the end of the pool
    pad = ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0))
    inputs["k_cache"] = jnp.pad(inputs["k_cache"], pad, constant_values=jnp.nan)
    inputs["v_cache"] = jnp.pad(inputs["v_cache"], pad, constant_values=jnp.nan)
    tables = jnp.clip(inputs["block_tables"], 0, poisoned - 1)  # junk columns: finite pages
    inputs["block_tables"] = tables.at[:, 5].set(poisoned)  # 11 keys need 2 columns
    assert np.isnan(np.asarray(paged_attention_xla(**inputs, scale=0.2, narrowed=False))).any()
    out = np.asarray(paged_attention_xla(**inputs, scale=0.2, narrowed=True))
    assert np.isfinite(out).all()


def _switches(inputs: dict) -> bool:
    return "cond" in str(jax.make_jaxpr(functools.partial(paged_attention_xla, scale=0.2))(**inputs))


def test_decode_narrows_only_when_it_gathers_enough_keys() -> None:
    """One row over a short table reads it whole; many rows over the same width narrow; prefill never."""
    width = 8
    one = make_inputs(
        block_size=8, group=2, starts=[3], new_tokens=[1], q_len=1, dtype=jnp.float32, table_width=width
    )
    rows = -(-rw.NARROW_MIN_KEYS // (width * 8))
    many = make_inputs(
        block_size=8,
        group=2,
        starts=[3] * rows,
        new_tokens=[1] * rows,
        q_len=1,
        dtype=jnp.float32,
        table_width=width,
    )
    prefill = make_inputs(
        block_size=8,
        group=2,
        starts=[0] * rows,
        new_tokens=[2] * rows,
        q_len=2,
        dtype=jnp.float32,
        table_width=width,
    )
    assert not _switches(one)
    assert _switches(many)
    assert not _switches(prefill)


def test_one_row_reads_even_a_wide_table_whole() -> None:
    """However many keys its table holds, one decode row takes no switch; two rows over it do."""
    width = -(-rw.NARROW_MIN_KEYS // 8)  # 8-key blocks: NARROW_MIN_KEYS keys in one row's table

    def rows(n: int) -> dict:
        return make_inputs(
            block_size=8,
            group=2,
            starts=[3] * n,
            new_tokens=[1] * n,
            q_len=1,
            dtype=jnp.float32,
            table_width=width,
        )

    assert not _switches(rows(1))
    assert _switches(rows(2))
