"""The Pallas paged-attention kernel against the XLA reference: interpreted on CPU, compiled with Triton
on a GPU (the kernels decide from the backend, so `JAX_PLATFORMS=cuda pytest` checks the compiled kernel).

Interpret mode fills a kernel's outputs with NaN before running it, so "no NaN anywhere" also checks
that every output element was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs import ops
from pallas_kernels import paged_attention as paged
from pallas_kernels import read_widths
from pallas_kernels.paged_attention import paged_attention_pallas, paged_attention_xla

NUM_LAYERS = 3
LAYER = 2  # not the first layer of the cache


def make_inputs(
    *,
    block_size: int,
    group: int,
    starts: list[int],
    new_tokens: list[int],
    q_len: int,
    dtype,
    kv_heads: int = 2,
    head_dim: int = 32,
    table_width: int | None = None,
    seed: int = 0,
) -> dict:
    """A batch where sequence i has `starts[i]` cached tokens and `new_tokens[i]` tokens in this step
    (0 new tokens and start 0: a padding row); query tokens past a sequence's new tokens sit at
    position 0, like the engine's padding. Block tables are shuffled and their unused entries junk."""
    rng = np.random.default_rng(seed)
    batch = len(starts)
    context_lens = np.array([s + n for s, n in zip(starts, new_tokens, strict=True)], np.int32)
    pages = [-(-int(c) // block_size) for c in context_lens]
    width = table_width or max(max(pages), 1)
    num_blocks = sum(pages) + 3
    ids = rng.permutation(num_blocks).astype(np.int32)
    tables = rng.integers(-2, num_blocks + 5, (batch, width)).astype(np.int32)  # junk past the context
    used = 0
    for i, n in enumerate(pages):
        tables[i, :n] = ids[used : used + n]
        used += n
    positions = np.zeros((batch, q_len), np.int32)
    for i, (s, n) in enumerate(zip(starts, new_tokens, strict=True)):
        positions[i, :n] = np.arange(s, s + n)
    cache_shape = (NUM_LAYERS, num_blocks, block_size, kv_heads, head_dim)
    return dict(
        q=jnp.asarray(rng.standard_normal((batch, q_len, kv_heads * group, head_dim)), dtype),
        k_cache=jnp.asarray(rng.standard_normal(cache_shape), dtype),
        v_cache=jnp.asarray(rng.standard_normal(cache_shape), dtype),
        layer=jnp.int32(LAYER),
        block_tables=jnp.asarray(tables),
        positions=jnp.asarray(positions),
        context_lens=jnp.asarray(context_lens),
    )


def decode_inputs(lens: list[int], **kwargs) -> dict:
    """`make_inputs` for one decode token a row over contexts of `lens` keys (0: a padding row)."""
    return make_inputs(
        starts=[max(n - 1, 0) for n in lens], new_tokens=[min(n, 1) for n in lens], q_len=1, **kwargs
    )


def check(inputs: dict, *, scale: float = 0.2, sliding_window=None, soft_cap=None, **tuning) -> None:
    options = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = paged_attention_pallas(**inputs, **options, **tuning)
    ref = paged_attention_xla(**inputs, **options)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out32).any()
    padding_rows = np.asarray(inputs["context_lens"]) == 0
    assert (out32[padding_rows] == 0).all()
    tol = 1e-5 if out.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out32, ref32, rtol=tol, atol=tol)


DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("block_size", "group"), [(8, 1), (16, 3), (8, 8)], ids=["bs8-g1", "bs16-g3", "bs8-g8"]
)
def test_decode(block_size: int, group: int, dtype) -> None:
    # contexts: one key, exactly one and two blocks, one past a block, ragged, and a padding row
    lens = [1, block_size, 2 * block_size, block_size + 1, 3 * block_size - 3, 0]
    inputs = decode_inputs(lens, block_size=block_size, group=group, dtype=dtype)
    check(inputs)


@pytest.mark.parametrize("q_len", [1, 3])
def test_float16_cache_with_float32_queries(q_len: int) -> None:
    """A float16 KV cache (`kv_cache_dtype`) under float32 compute: both kernels read the stored values
    exactly, so they match the same float32 cache to float32 precision."""
    inputs = make_inputs(
        block_size=8, group=3, starts=[5, 17, 0], new_tokens=[q_len, q_len, 0], q_len=q_len, dtype=jnp.float32
    )
    half = dict(
        inputs, k_cache=inputs["k_cache"].astype(jnp.float16), v_cache=inputs["v_cache"].astype(jnp.float16)
    )
    check(half)
    widened = dict(
        half, k_cache=half["k_cache"].astype(jnp.float32), v_cache=half["v_cache"].astype(jnp.float32)
    )
    out = paged_attention_xla(**half, scale=0.2)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, paged_attention_xla(**widened, scale=0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("block_size", "group"), [(16, 1), (8, 3), (16, 8)], ids=["bs16-g1", "bs8-g3", "bs16-g8"]
)
def test_prefill_chunk_on_cached_prefix(block_size: int, group: int, dtype) -> None:
    # chunks crossing a block boundary, ending exactly on one, a fresh prompt shorter than the chunk
    # (padded query tokens), a chunk starting on a boundary, and a padding row
    inputs = make_inputs(
        block_size=block_size,
        group=group,
        starts=[block_size - 3, block_size - 5, 0, 2 * block_size, 0],
        new_tokens=[5, 5, 3, 5, 0],
        q_len=5,
        dtype=dtype,
    )
    check(inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len", [1, 6], ids=["decode", "prefill"])
def test_sliding_window_soft_cap_scale(q_len: int, dtype) -> None:
    inputs = make_inputs(
        block_size=8,
        group=3,
        starts=[37 - q_len, 20 - q_len, 0, 3],
        new_tokens=[q_len, q_len, 0, q_len],
        q_len=q_len,
        dtype=dtype,
    )
    check(inputs, scale=0.7, sliding_window=11, soft_cap=4.0)
    check(inputs, scale=0.05, sliding_window=8)  # window exactly one block


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_kv_splits(num_splits: int) -> None:
    # 8 splits over at most 6 steps of 16 keys: some splits are empty
    inputs = make_inputs(
        block_size=8,
        group=3,
        starts=[90, 15, 40, 0],
        new_tokens=[1, 1, 1, 0],
        q_len=1,
        dtype=jnp.float32,
    )
    check(inputs, keys_per_step=16, num_splits=num_splits)
    check(inputs, keys_per_step=16, num_splits=num_splits, sliding_window=30, soft_cap=3.0)


def test_kv_splits_prefill_bf16() -> None:
    inputs = make_inputs(
        block_size=16, group=1, starts=[70, 3, 0], new_tokens=[4, 4, 0], q_len=4, dtype=jnp.bfloat16
    )
    check(inputs, keys_per_step=16, num_splits=4)


def test_several_row_blocks_and_page_steps() -> None:
    # 6 tokens x 8 heads = 48 rows in blocks of 16; 2 pages per loop step; a table wider than needed
    inputs = make_inputs(
        block_size=8,
        group=8,
        starts=[30, 0, 9],
        new_tokens=[6, 6, 2],
        q_len=6,
        dtype=jnp.float32,
        table_width=9,
    )
    check(inputs, rows_per_block=16, keys_per_step=16)
    check(inputs, rows_per_block=16, keys_per_step=16, sliding_window=7)


def test_head_dim_not_power_of_two() -> None:
    inputs = make_inputs(
        block_size=8, group=2, starts=[12, 0], new_tokens=[3, 2], q_len=3, dtype=jnp.float32, head_dim=40
    )
    check(inputs)


def test_under_jit_with_traced_layer() -> None:
    inputs = make_inputs(
        block_size=16, group=3, starts=[20, 5], new_tokens=[1, 1], q_len=1, dtype=jnp.float32
    )
    fn = jax.jit(lambda layer, **kw: paged_attention_pallas(layer=layer, **kw, scale=0.3))
    for layer in range(NUM_LAYERS):
        inputs["layer"] = jnp.int32(layer)
        out = fn(**inputs)
        ref = paged_attention_xla(**inputs, scale=0.3)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_len", "num_splits"), [(1, 1), (1, 2), (5, 1)], ids=["decode", "splits", "prefill"]
)
def test_lowers_to_triton(q_len: int, num_splits: int, dtype) -> None:
    """Every op of the kernel has a Triton lowering, with all options on (jaxpr -> Triton IR here;
    compiling it needs a GPU)."""
    inputs = make_inputs(
        block_size=16, group=3, starts=[5, 40], new_tokens=[q_len, q_len], q_len=q_len, dtype=dtype
    )
    options = dict(scale=0.2, sliding_window=8, soft_cap=30.0, num_splits=num_splits, interpret=False)
    fn = jax.jit(functools.partial(paged_attention_pallas, **options))
    text = fn.trace(**inputs).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


def test_registered() -> None:
    assert ops.resolve("paged_attention", "pallas") is paged_attention_pallas
    assert ops.default_name("paged_attention", "cpu") == "xla"
    assert ops.default_name("paged_attention", "gpu") == "pallas"


@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize(("window", "soft_cap"), [(6, None), (4, 5.0), (1, None), (13, 2.0)])
def test_windowed_decode_equals_the_whole_table(
    group: int, window: int, soft_cap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a sliding window narrower than the table, a decode row reads only its window's pages (rows
    long and short, one ending a block, one shorter than the window, a padding row; one row and several,
    the windowed tables narrowed too): the same as reading the whole table."""
    monkeypatch.setattr(read_widths, "NARROW_MIN_KEYS", 0)
    lens = [47, 20, 1, 16, 0, 30, 5]
    for rows in (lens[:1], lens):
        inputs = decode_inputs(rows, block_size=4, group=group, dtype=jnp.float32, table_width=12, seed=group)
        options = dict(scale=0.3, sliding_window=window, soft_cap=soft_cap)
        whole = paged_attention_xla(**inputs, **options, narrowed=False)
        windowed = paged_attention_xla(**inputs, **options)
        np.testing.assert_allclose(np.asarray(windowed), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_windowed_decode_reads_only_the_window() -> None:
    """A NaN page before every row's window poisons the whole-table read (0 x NaN in the weighted sum
    of values) and not the windowed one, which never gathers it."""
    inputs = make_inputs(
        block_size=4, group=3, starts=[40, 29], new_tokens=[1, 1], q_len=1, dtype=jnp.float32, table_width=12
    )
    tables = np.asarray(inputs["block_tables"])
    poisoned = {int(tables[0, 1]), int(tables[1, 0])}  # keys 4-7 of row 0, 0-3 of row 1: behind a window of 8
    v = np.asarray(inputs["v_cache"]).copy()
    v[LAYER, sorted(poisoned)] = np.nan
    inputs = dict(inputs, v_cache=jnp.asarray(v))
    options = dict(scale=0.2, sliding_window=8)
    assert np.isnan(np.asarray(paged_attention_xla(**inputs, **options, narrowed=False))).any()
    assert np.isfinite(np.asarray(paged_attention_xla(**inputs, **options))).all()


def test_decode_chunk_rows_divide_the_batch() -> None:
    """All rows while they gather few keys together; else the most rows that stay under a chunk's keys and
    divide the batch."""
    most = paged.DECODE_CHUNK_ELEMENTS
    assert paged.decode_chunk_rows(32, paged.DECODE_CHUNK_FROM // 32) == 32
    assert paged.decode_chunk_rows(32, paged.DECODE_CHUNK_FROM // 32 + 1) < 32
    assert paged.decode_chunk_rows(32, most // 4) == 4
    assert paged.decode_chunk_rows(24, most // 5) == 4  # 5 do not divide 24
    assert paged.decode_chunk_rows(7, most) == 1  # 7 is prime
    assert paged.decode_chunk_rows(8, most * 2) == 2  # one row over the chunk's keys: two rows a chunk


@pytest.mark.parametrize(
    ("group", "window", "soft_cap", "cache_dtype"),
    [
        (1, None, None, jnp.float32),
        (3, None, None, jnp.float16),
        (7, 6, 5.0, jnp.float32),
        (3, 6, None, jnp.float16),
    ],
)
def test_decode_in_row_chunks_equals_the_whole_batch(
    group: int, window: int | None, soft_cap: float | None, cache_dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode rows attended a chunk at a time (2 and 4 rows a chunk; ragged rows, a padding row,
    shuffled tables, narrowed or not, windowed or not): the same as all rows at once."""
    lens = [47, 20, 1, 16, 0, 30, 5, 33]
    inputs = decode_inputs(lens, block_size=4, group=group, dtype=jnp.float32, table_width=12, seed=group)
    inputs["k_cache"], inputs["v_cache"] = (inputs[c].astype(cache_dtype) for c in ("k_cache", "v_cache"))
    options = dict(scale=0.3, sliding_window=window, soft_cap=soft_cap)
    attend = functools.partial(paged_attention_xla, **inputs, **options)
    monkeypatch.setattr(paged, "DECODE_CHUNK_ELEMENTS", 2**62)
    whole = {narrowed: np.asarray(attend(narrowed=narrowed)) for narrowed in (None, False)}
    assert "scan" not in str(jax.make_jaxpr(lambda: attend())())  # a new function: traced again
    pages = 12 if window is None else 3  # the table's width, or the pages a window of 6 keys spans
    row = pages * 4 * 2 * 32  # a row's key elements: blocks of 4 keys, 2 KV heads of 32
    monkeypatch.setattr(paged, "DECODE_CHUNK_FROM", 0)
    for rows in (2, 4):
        monkeypatch.setattr(paged, "DECODE_CHUNK_ELEMENTS", rows * row)
        assert "scan" in str(jax.make_jaxpr(lambda: attend())())  # the rows' loop
        for narrowed, expected in whole.items():
            out = np.asarray(attend(narrowed=narrowed))
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=f"{rows} rows a chunk")
