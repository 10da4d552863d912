"""Host-side bookkeeping of the paged KV pool: free blocks, reference counts, and the prefix cache.

Prefix caching: once a block is full, its content is named by a chain hash of (the previous block's
hash, the block's token ids, extra keys such as an adapter or image id). A later sequence whose prompt
starts with the same blocks reuses them instead of recomputing their K/V. A hash is not proof of equal
content, so a block found by its hash is reused only if the key it was registered with (parent hash,
token ids, extra key) equals the lookup's; a collision is a miss. A request's `cache_salt` (vLLM's)
joins its first block's extra key (`SaltedKey`), so through the chain every block of a salted request
hashes apart from any other salt's (or none): only requests with equal salts share cached blocks.
Blocks nobody references stay cached until their space is needed; they are evicted least recently used
first.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from jaxrs.engine.options import BLOCK_SIZES
from jaxrs.errors import JaxrsError


@dataclasses.dataclass
class BlockTable:
    """One sequence's physical blocks, and the chain hashes of those already full and registered."""

    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached
    evictions: int = 0  # cached blocks reclaimed for new content


BlockKey = tuple[int | None, tuple[int, ...], Hashable]  # (parent hash, token ids, extra key)


def block_extra(extra: Hashable, start: int, end: int) -> Hashable:
    """The extra key of the block holding tokens [start, end): a key with a `block_key` (images) names
    only what overlaps that block."""
    return extra.block_key(start, end) if hasattr(extra, "block_key") else extra


@dataclasses.dataclass(frozen=True)
class SaltedKey:
    """A request's extra key with its `cache_salt`: the salt joins the first block's key only (as in
    vLLM); the blocks after it differ through their parent hash."""

    salt: str
    base: Hashable = None

    def block_key(self, start: int, end: int) -> Hashable:
        base = block_extra(self.base, start, end)
        return ("cache_salt", self.salt, base) if start == 0 else base


def salted(extra: Hashable, salt: str | None) -> Hashable:
    """`extra` with `salt` (None: no salt, `extra` itself); a salt that is not a non-empty string is a
    JaxrsError, as vLLM refuses it."""
    if salt is None:
        return extra
    if not isinstance(salt, str) or not salt:
        raise JaxrsError("cache_salt must be a non-empty string")
    return SaltedKey(salt, extra)


def chain_hash(parent: int | None, tokens: Sequence[int], extra: Hashable = None) -> int:
    return hash((parent, tuple(tokens), extra))


class BlockManager:
    """Allocates blocks to block tables; shares and caches full blocks when prefix caching is on."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        stats: PrefixCacheStats | None = None,
    ):
        """`stats`: counters to go on counting into (a pool rebuilt for new weights keeps the old one's)."""
        if block_size not in BLOCK_SIZES:
            sizes = ", ".join(map(str, BLOCK_SIZES[:-1])) + f" or {BLOCK_SIZES[-1]}"
            raise ValueError(f"block size must be {sizes}, not {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.stats = stats if stats is not None else PrefixCacheStats()
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks  # what a cached block's hash names
        self._cached: dict[int, int] = {}  # chain hash -> block
        # Unreferenced blocks, eviction order first: never-cached blocks are taken before cached ones.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    # -- capacity -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------
    def match_prefix(self, table: BlockTable, token_ids: Sequence[int], extra: Hashable = None) -> int:
        """Attach the longest cached prefix of `token_ids` to an empty table; returns the tokens covered.

        At least one token is always left to compute, since the step that follows must produce logits.
        """
        assert not table.blocks, "prefix matching starts from an empty table"
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        full = (len(token_ids) - 1) // bs
        self.stats.queries += len(token_ids)
        parent = None
        for i in range(full):
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]), block_extra(extra, i * bs, (i + 1) * bs))
            h = chain_hash(*key)
            block = self._cached.get(h)
            if block is None or self._key_of[block] != key:  # absent, or a hash collision
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(h)
            parent = h
        covered = len(table.blocks) * bs
        self.stats.hits += covered
        return covered

    def register_full_blocks(
        self, table: BlockTable, token_ids: Sequence[int], num_computed: int, extra: Hashable = None
    ) -> None:
        """Name the table's blocks that became full (their K/V computed) so later prompts can reuse them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(table.hashes), num_computed // bs):
            parent = table.hashes[-1] if table.hashes else None
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]), block_extra(extra, i * bs, (i + 1) * bs))
            h = chain_hash(*key)
            table.hashes.append(h)
            block = table.blocks[i]
            if h not in self._cached and self._hash_of[block] is None:
                self._cached[h] = block
                self._hash_of[block] = h
                self._key_of[block] = key

    # -- allocation ---------------------------------------------------------------------------------
    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(table.blocks) <= len(self._free)

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Extend the table to hold `num_tokens` tokens; False (nothing allocated) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(table.blocks)
        if missing > len(self._free):
            return False
        for _ in range(missing):
            block = next(iter(self._free))
            if self._hash_of[block] is not None:  # reclaim a cached block
                del self._cached[self._hash_of[block]]
                self._hash_of[block] = self._key_of[block] = None
                self.stats.evictions += 1
            self._take(block)
            table.blocks.append(block)
        return True

    def fork(self, table: BlockTable, num_tokens: int) -> BlockTable:
        """A new table sharing the full blocks covering the first `num_tokens` tokens (n > 1 samples)."""
        shared = min(num_tokens // self.block_size, len(table.blocks))
        for block in table.blocks[:shared]:
            self._take(block)
        return BlockTable(table.blocks[:shared], table.hashes[:shared])

    def free(self, table: BlockTable) -> None:
        """Drop the table's references; its unreferenced blocks become reusable (cached ones last)."""
        for block in reversed(table.blocks):  # a sequence's tail is evicted before its prefix
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:
                    self._free.move_to_end(block, last=False)
        table.blocks.clear()
        table.hashes.clear()

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1
