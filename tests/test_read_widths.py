"""Decode attention reads only the table columns the longest row needs, with the whole table's result."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.ops import qmatmul_xla
from pallas_kernels import read_widths as rw
from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.read_widths import read_widths
from tests.test_paged_attention import make_inputs
from tests.test_qmatmul_few_rows import _dot_fusion_parameters, packed


def test_read_widths_step_evenly_through_each_octave_to_the_table() -> None:
    assert read_widths(8) == [2, 4, 6, 8]
    assert read_widths(16) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert read_widths(40) == [2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40]
    assert read_widths(64, 2) == [2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert read_widths(3) == [2, 3] and read_widths(1) == [1]
    assert read_widths(16, 0) == [16]


@pytest.mark.parametrize("width", [8, 100, 512, 2048])
def test_a_row_reads_under_a_quarter_octave_more_than_it_needs(width: int) -> None:
    """Whatever the table's width, a row needing n blocks reads fewer than n / 4 more (at most one more
    below 8), so a decode over the widest table reads about what a table bucketed to its context would."""
    widths = read_widths(width)
    for needed in range(1, width + 1):
        read = min(w for w in widths if w >= needed)
        assert read - needed < max(rw.MIN_READ_STEP, needed / 4), (needed, read)


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


def test_decodes_over_tables_of_enough_keys_narrow_and_prefill_never(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row over a table of NARROW_MIN_KEYS keys takes the width switch, as do many rows; a smaller table
    is read whole; a prompt chunk never narrows, nor a decode with STEPS_PER_OCTAVE = 0 (for benchmarks)."""

    def inputs(rows: int, q_len: int = 1, width: int = rw.NARROW_MIN_KEYS // 8) -> dict:
        return make_inputs(
            block_size=8,
            group=2,
            starts=[3] * rows,
            new_tokens=[q_len] * rows,
            q_len=q_len,
            dtype=jnp.float32,
            table_width=width,
        )

    assert _switches(inputs(1))
    assert _switches(inputs(5))
    assert not _switches(inputs(5, width=rw.NARROW_MIN_KEYS // 8 - 1))
    assert not _switches(inputs(3, q_len=2))
    monkeypatch.setattr(rw, "STEPS_PER_OCTAVE", 0)
    assert not _switches(inputs(1))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled code")
def test_one_narrowed_row_reaches_the_next_product_flat() -> None:
    """The switch hands o_proj's one-row GEMV the attention output as the flat row it reads. Returned in
    the attention's own shape (the check builds that switch too), the GEMV read it through that shape,
    index by index, at a fraction of its speed. Same values either way."""
    width = rw.NARROW_MIN_KEYS // 8
    inputs = make_inputs(
        block_size=8, group=2, starts=[19], new_tokens=[1], q_len=1, dtype=jnp.float32, table_width=width
    )
    heads, dim = inputs["q"].shape[2:]
    weight = packed("Q8F", out=64, in_features=heads * dim)
    widths = read_widths(width)

    def unflattened(**inputs) -> jax.Array:  # the switch's branches as they were
        index = jnp.sum(jnp.asarray(widths[:-1]) < (jnp.max(inputs["context_lens"]) + 7) // 8)
        whole = functools.partial(paged_attention_xla, **inputs, scale=0.2, narrowed=False)
        branches = [lambda t, w=w: whole(block_tables=t[:, :w]) for w in widths]
        return jax.lax.switch(index, branches, inputs["block_tables"])

    def step(attention):
        return jax.jit(lambda inputs, w: qmatmul_xla(attention(**inputs).reshape(1, heads * dim), w))

    narrowed = functools.partial(paged_attention_xla, scale=0.2)
    ours = step(narrowed).lower(inputs, weight).compile().as_text()
    before = step(unflattened).lower(inputs, weight).compile().as_text()

    def gemv_inputs(text: str) -> list[tuple[int, ...]]:  # what the products reading the weight take
        return [s for shapes in _dot_fusion_parameters(text) if (64, heads * dim) in shapes for s in shapes]

    assert any(len(s) > 2 for s in gemv_inputs(before)), "the check would not see it"
    assert gemv_inputs(ours) and all(len(s) <= 2 for s in gemv_inputs(ours))
    np.testing.assert_allclose(
        np.asarray(step(narrowed)(inputs, weight)),
        np.asarray(step(unflattened)(inputs, weight)),
        rtol=1e-6,
        atol=1e-6,
    )
