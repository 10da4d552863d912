"""Host-side bookkeeping of the paged KV pool: which physical blocks are free, who holds which."""

from __future__ import annotations

from collections import deque


class OutOfBlocks(Exception):
    """The pool cannot satisfy an allocation; the scheduler answers by waiting or preempting."""


class BlockManager:
    """A free list of fixed-size blocks with reference counts (shared blocks come with prefix caching)."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size not in (8, 16, 32):
            raise ValueError(f"block size must be 8, 16 or 32, not {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
            elif self._refs[b] < 0:
                raise RuntimeError(f"block {b} freed twice")

    def ensure_capacity(self, table: list[int], num_tokens: int) -> None:
        """Grow a block table in place so it holds `num_tokens` tokens."""
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))
