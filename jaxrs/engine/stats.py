"""What the engine reports about itself (`Engine.stats()`), so readers need not know its parts."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """The engine's gauges and counters at one moment. Counters run over the engine's life, across
    weight swaps (`Engine.requantize`)."""

    num_running: int  # sequences being generated
    num_waiting: int  # sequences queued (new, preempted, or forked samples not yet admitted)
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int  # tokens per KV block
    prefix_cache_lookups: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    prefix_cache_evictions: int  # cached blocks reclaimed for new content
    num_preemptions: int  # sequences preempted for lack of KV blocks
    compiled_shapes: int  # step shapes the current runner has compiled
    pending_shapes: int  # step shapes its warm-up has yet to compile (in the background)
    device_seconds: float  # wall time inside the current runner's step calls
