"""Block pool bookkeeping and the prefix cache (host-only, fast)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from jaxrs.engine.block_manager import BlockManager, BlockTable, SaltedKey, salted
from jaxrs.errors import JaxrsError
from jaxrs.vision.prompt import ImageCacheKey


def filled(bm: BlockManager, tokens: list[int], extra: Hashable = None) -> BlockTable:
    """A table holding `tokens`, all computed and registered."""
    table = BlockTable()
    bm.match_prefix(table, tokens, extra)
    assert bm.grow(table, len(tokens))
    bm.register_full_blocks(table, tokens, len(tokens), extra)
    return table


def test_grow_and_free_return_every_block():
    bm = BlockManager(8, 16, prefix_caching=False)
    a, b = BlockTable(), BlockTable()
    assert bm.grow(a, 33) and len(a.blocks) == 3
    assert bm.grow(b, 80) and len(b.blocks) == 5
    assert bm.num_free == 0 and not bm.grow(a, 49)
    assert len(a.blocks) == 3  # a failed grow allocates nothing
    assert len(set(a.blocks) | set(b.blocks)) == 8
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and bm.num_used == 0


def test_block_size_is_checked():
    with pytest.raises(ValueError, match="8, 16 or 32"):
        BlockManager(4, 12)


def test_prefix_hit_shares_full_blocks_and_keeps_one_token_to_compute():
    bm = BlockManager(16, 8)
    prompt = list(range(40))  # 5 full blocks
    first = filled(bm, prompt)
    second = BlockTable()
    covered = bm.match_prefix(second, prompt)
    assert covered == 32  # 4 blocks: the last token must still run to produce logits
    assert second.blocks == first.blocks[:4]
    assert bm.stats.hits == 32 and bm.stats.queries == 80


def test_chain_hash_depends_on_the_whole_prefix_and_extra_key():
    bm = BlockManager(16, 8)
    filled(bm, list(range(24)))
    other = BlockTable()
    assert bm.match_prefix(other, [99] + list(range(1, 24))) == 0  # first block differs: nothing matches
    bm.free(other)
    keyed = BlockTable()
    assert bm.match_prefix(keyed, list(range(24)), extra="adapter-1") == 0
    bm.free(keyed)
    plain = BlockTable()
    assert bm.match_prefix(plain, list(range(24))) == 16


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, 8)
    a = filled(bm, list(range(16)))  # 2 blocks, cached
    bm.free(a)
    assert bm.num_free == 4  # cached but unreferenced blocks count as free
    hit = BlockTable()
    assert bm.match_prefix(hit, list(range(17))) == 16
    bm.free(hit)
    b = BlockTable()
    assert bm.grow(b, 32)  # needs all 4 blocks: the 2 cached ones are evicted
    assert bm.stats.evictions == 2
    bm.free(b)
    miss = BlockTable()
    assert bm.match_prefix(miss, list(range(17))) == 0


def test_uncached_blocks_are_taken_before_cached_ones():
    bm = BlockManager(4, 8)
    cached = filled(bm, list(range(8)))
    bm.free(cached)
    scratch = BlockTable()
    assert bm.grow(scratch, 24)  # 3 blocks: the 3 never-cached ones
    assert bm.stats.evictions == 0
    again = BlockTable()
    assert bm.match_prefix(again, list(range(9))) == 8


def test_fork_shares_full_blocks_with_reference_counts():
    bm = BlockManager(8, 8, prefix_caching=False)
    parent = BlockTable()
    bm.grow(parent, 20)  # 2 full blocks + 1 partial
    child = bm.fork(parent, 20)
    assert child.blocks == parent.blocks[:2]
    bm.free(parent)
    assert bm.num_free == 6  # the shared blocks are still held by the child
    bm.free(child)
    assert bm.num_free == 8
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(BlockTable([0]))


def test_a_hash_collision_is_a_miss(monkeypatch):
    """Every block hashes alike here: a block found by its hash is reused only if it holds the same
    tokens (after the same prefix, under the same extra key)."""
    monkeypatch.setattr("jaxrs.engine.block_manager.chain_hash", lambda parent, tokens, extra=None: 7)
    bm = BlockManager(8, 8)
    filled(bm, list(range(17)))  # 2 full blocks registered under the one hash
    other = BlockTable()
    assert bm.match_prefix(other, list(range(100, 117))) == 0  # same hash, other tokens: not reused
    bm.free(other)
    same = BlockTable()
    assert bm.match_prefix(same, list(range(17))) == 8  # the first block's own tokens still hit
    assert bm.stats.hits == 8


def test_prefix_cache_counters_carry_over_to_a_new_pool():
    old = BlockManager(4, 8)
    filled(old, list(range(16)))
    new = BlockManager(8, 8, stats=old.stats)
    filled(new, list(range(16)))
    assert new.stats is old.stats and new.stats.queries == 32


def test_a_cache_salt_keys_the_first_block_so_only_equal_salts_share():
    """vLLM's cache_salt: the salt joins the first block's key, and the chain carries it on."""
    bm = BlockManager(16, 8)
    prompt = list(range(24))
    filled(bm, prompt)  # unsalted
    salt = salted(None, "a")
    assert salted("adapter", None) == "adapter"
    assert salt.block_key(0, 8) == ("cache_salt", "a", None) and salt.block_key(8, 16) is None

    def covered(extra) -> int:
        table = BlockTable()
        n = bm.match_prefix(table, prompt, extra)
        bm.free(table)
        return n

    assert covered(salt) == 0 and covered(None) == 16
    filled(bm, prompt, salt)
    assert covered(SaltedKey("a")) == 16 and covered(salted(None, "b")) == 0 and covered(None) == 16
    with pytest.raises(JaxrsError, match="cache_salt must be a non-empty string"):
        salted(None, "")
    images = ImageCacheKey("adapter", ((4, 12, b"image"),))  # a keyed base keeps naming its own blocks
    assert salted(images, "a").block_key(0, 8) == ("cache_salt", "a", images.block_key(0, 8))
    assert salted(images, "a").block_key(8, 16) == images.block_key(8, 16) != images.block_key(16, 24)
