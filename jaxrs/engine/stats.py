"""What the engine reports about itself (`Engine.stats()`), so readers need not know its parts."""

from __future__ import annotations

import dataclasses
from typing import Any


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
    spec_decode: Any = None  # speculative decoding's counters (`speculative.SpecDecodeStats`), if it is on


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Where the engine's memory goes (`Engine.memory()`), in bytes.

    `weights` and `kv_pool` are the arrays' own sizes (on CPU they live in the process's resident memory,
    elsewhere in the device's). `compiled` is the resident memory grown since the engine was ready to serve:
    the compiled step shapes, chiefly. `rest` is what else was resident then beside the host's share of the
    weights and the pool: the runtime, the tokenizer, Python. Resident figures are None where the system does
    not report them."""

    weights: int
    kv_pool: int
    compiled: int | None
    rest: int | None
    resident: int | None
    peak_resident: int | None

    def summary(self) -> str:
        """One line, in MiB."""

        def mib(n: int | None) -> str:
            return "?" if n is None else f"{n / 2**20:.1f}"

        return (
            f"memory: weights {mib(self.weights)} MiB, KV pool {mib(self.kv_pool)} MiB, compiled steps "
            f"{mib(self.compiled)} MiB, rest {mib(self.rest)} MiB; resident {mib(self.resident)} MiB "
            f"(peak {mib(self.peak_resident)} MiB)"
        )
