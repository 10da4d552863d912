"""The tiled (flash-style) XLA attention against the dense form, at tiles small enough that every case
walks several query tiles and several key tiles: ragged chunks on cached prefixes, GQA, windows,
soft-caps, a float16 cache, junk past the context, padding rows; and which form the op picks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import paged_attention_xla
from pallas_kernels.tiled_attention import tiled_paged_attention
from tests.test_paged_attention import make_inputs

SMALL_TILES = dict(query_tile=4, key_tile=16)
TILED = ("while", "scan")  # the loops of the tiled form (one key tile: the query tiles' alone)


def check(inputs: dict, *, scale: float = 0.2, sliding_window=None, soft_cap=None, **tiles) -> None:
    options = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = tiled_paged_attention(**inputs, **options, **(tiles or SMALL_TILES))
    ref = paged_attention_xla(**inputs, **options, tiled=False)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out32).any()
    assert (out32[np.asarray(inputs["context_lens"]) == 0] == 0).all()  # padding rows
    tol = 1e-5 if out.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out32, ref32, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "dtype", [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]
)
@pytest.mark.parametrize(
    ("block_size", "group"), [(8, 1), (8, 3), (16, 4)], ids=["bs8-g1", "bs8-g3", "bs16-g4"]
)
def test_chunks_on_cached_prefixes(block_size: int, group: int, dtype) -> None:
    # a whole prompt, a chunk on a long prefix, a short one (padded query tokens), a padding row; 11 query
    # tokens are 3 tiles of 4, the last one padded
    inputs = make_inputs(
        block_size=block_size,
        group=group,
        starts=[0, 45, 3, 0],
        new_tokens=[11, 11, 2, 0],
        q_len=11,
        dtype=dtype,
    )
    check(inputs)


@pytest.mark.parametrize("query_tile", [1, 4, 16])
@pytest.mark.parametrize("key_tile", [4, 16, 64])  # under a block, two blocks, the whole table
def test_tile_sizes(query_tile: int, key_tile: int) -> None:
    inputs = make_inputs(
        block_size=8, group=3, starts=[21, 0], new_tokens=[13, 9], q_len=13, dtype=jnp.float32, table_width=9
    )
    check(inputs, query_tile=query_tile, key_tile=key_tile)


@pytest.mark.parametrize("window", [None, 5, 40])
def test_a_table_of_one_key_tile_runs_it_once(window) -> None:
    """A table of exactly one key tile (a short prompt) takes one masked step, no loops over key tiles."""
    inputs = make_inputs(
        block_size=8,
        group=3,
        starts=[20, 0, 0],
        new_tokens=[12, 12, 0],
        q_len=12,
        dtype=jnp.float32,
        table_width=4,
    )
    one_tile = functools.partial(tiled_paged_attention, query_tile=4, key_tile=32)
    assert not _loops(one_tile, inputs)
    assert _loops(functools.partial(tiled_paged_attention, query_tile=4, key_tile=16), inputs)
    check(inputs, sliding_window=window, query_tile=4, key_tile=32)


def test_default_tiles_are_the_module_settings(monkeypatch) -> None:
    """Unset tiles are `QUERY_TILE` and `KEY_TILE`, read at each call (what a benchmark variant sets), and
    the engine's tiles walk a 512-key table in key tiles of 256: two, so it loops."""
    from pallas_kernels import tiled_attention as ta

    inputs = make_inputs(
        block_size=8, group=3, starts=[21, 0], new_tokens=[13, 9], q_len=13, dtype=jnp.float32
    )
    monkeypatch.setattr(ta, "QUERY_TILE", 4)
    monkeypatch.setattr(ta, "KEY_TILE", 16)
    unset = tiled_paged_attention(**inputs, scale=0.2)
    np.testing.assert_array_equal(
        np.asarray(unset), np.asarray(tiled_paged_attention(**inputs, scale=0.2, **SMALL_TILES))
    )
    monkeypatch.setattr(ta, "KEY_TILE", 64)
    assert not np.array_equal(np.asarray(unset), np.asarray(tiled_paged_attention(**inputs, scale=0.2)))
    monkeypatch.undo()
    assert (ta.QUERY_TILE, ta.KEY_TILE) == (256, 256)
    wide = make_inputs(
        block_size=16, group=3, starts=[0], new_tokens=[5], q_len=5, dtype=jnp.float32, table_width=32
    )
    assert _loops(tiled_paged_attention, wide)  # 512 keys: two key tiles, not one


@pytest.mark.parametrize("window", [5, 8, 19, 40])  # 40: whole key tiles inside the window
def test_sliding_window_and_soft_cap(window: int) -> None:
    inputs = make_inputs(
        block_size=8, group=3, starts=[40, 7, 0], new_tokens=[12, 12, 12], q_len=12, dtype=jnp.float32
    )
    check(inputs, scale=0.7, sliding_window=window, soft_cap=4.0)
    check(inputs, scale=0.05, sliding_window=window)


def test_float16_cache_under_float32_queries() -> None:
    inputs = make_inputs(block_size=8, group=3, starts=[30, 0], new_tokens=[9, 9], q_len=9, dtype=jnp.float32)
    half = dict(
        inputs, k_cache=inputs["k_cache"].astype(jnp.float16), v_cache=inputs["v_cache"].astype(jnp.float16)
    )
    check(half)
    assert tiled_paged_attention(**half, scale=0.2, **SMALL_TILES).dtype == jnp.float32


def test_under_jit_with_traced_layer() -> None:
    inputs = make_inputs(block_size=8, group=2, starts=[17], new_tokens=[6], q_len=6, dtype=jnp.float32)
    fn = jax.jit(functools.partial(tiled_paged_attention, scale=0.3, **SMALL_TILES))
    for layer in range(3):
        inputs["layer"] = jnp.int32(layer)
        ref = paged_attention_xla(**inputs, scale=0.3, tiled=False)
        np.testing.assert_allclose(np.asarray(fn(**inputs)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _loops(fn, inputs: dict, kinds: tuple[str, ...] = ("while",)) -> bool:
    """Whether `fn` traces to loops of these kinds: `while` (loops over key tiles), `scan` (over query
    tiles: the tiled form)."""
    jaxpr = str(jax.make_jaxpr(functools.partial(fn, scale=0.2))(**inputs))
    return any(kind in jaxpr for kind in kinds)


def test_the_op_picks_the_form_by_shape() -> None:
    """Several query tokens over a table of TILED_MIN_KEYS keys: tiled; fewer keys, or decode: dense."""
    wide = pa.TILED_MIN_KEYS // 8
    prefill = make_inputs(
        block_size=8, group=3, starts=[0], new_tokens=[5], q_len=5, dtype=jnp.float32, table_width=wide
    )
    assert _loops(paged_attention_xla, prefill, TILED)
    narrow = dict(prefill, block_tables=prefill["block_tables"][:, : wide - 1])
    assert not _loops(paged_attention_xla, narrow, TILED)
    decode = make_inputs(
        block_size=8, group=3, starts=[4], new_tokens=[1], q_len=1, dtype=jnp.float32, table_width=wide
    )
    assert not _loops(paged_attention_xla, decode, TILED)
    np.testing.assert_allclose(
        np.asarray(paged_attention_xla(**prefill, scale=0.2)),
        np.asarray(paged_attention_xla(**prefill, scale=0.2, tiled=False)),
        rtol=1e-5,
        atol=1e-5,
    )
