"""Data parallelism inside one server: D engine replicas, each on its own slice of the devices (a
tensor-parallel mesh of its own, or one device), behind one HTTP server. `ReplicaRouter` looks like
the `AsyncEngine` the server drives: each request goes to the replica with the fewest requests in
flight, ties broken by the prompt's first tokens, so prompts sharing a prefix tend to meet the
replica whose prefix cache holds it."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import Mesh

from jaxrs.engine.async_engine import AsyncEngine, EngineStats, QueueFullError, RequestUpdate
from jaxrs.engine.engine import Engine
from jaxrs.engine.options import MAX_WAITING
from jaxrs.engine.requantize import Requantized
from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.loading import LoadedModel
from jaxrs.parallel.mesh import tensor_mesh

T = TypeVar("T")

PREFIX_TOKENS = 16  # the prompt tokens that pick a replica among equally loaded ones


def replica_meshes(
    data_parallel_size: int, tensor_parallel_size: int = 1, devices: Sequence[jax.Device] | None = None
) -> list[Mesh | None]:
    """Replica i's mesh: devices [i * tp, (i + 1) * tp). A lone replica of one device takes none (the
    single-device engine as it always ran)."""
    if data_parallel_size < 1:
        raise JaxrsError(f"data_parallel_size must be at least 1, not {data_parallel_size}")
    pool = list(jax.devices() if devices is None else devices)
    need = data_parallel_size * tensor_parallel_size
    if need > len(pool):
        raise JaxrsError(
            f"data_parallel_size {data_parallel_size} x tensor_parallel_size {tensor_parallel_size} needs "
            f"{need} devices, but there are {len(pool)} {pool[0].platform.upper()} devices"
        )
    if data_parallel_size == 1 and tensor_parallel_size == 1:
        return [None]
    return [
        tensor_mesh(tensor_parallel_size, first=i * tensor_parallel_size, devices=pool)
        for i in range(data_parallel_size)
    ]


def _copy_structure(tree: Any) -> Any:
    """The nested dicts and tuples of a parameter tree copied, its arrays shared: each replica places
    (and rearranges) its own tree in place."""
    if isinstance(tree, dict):
        return {k: _copy_structure(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_copy_structure(v) for v in tree)
    return tree


def spare_trees(loaded: LoadedModel, data_parallel_size: int) -> list[dict]:
    """A parameter tree for each replica after the first, taken before the first engine rearranges
    and places its own in place. Checks there are devices for every replica."""
    if data_parallel_size == 1:
        return []
    replica_meshes(data_parallel_size)  # enough devices for one each, at least
    return [_copy_structure(loaded.params) for _ in range(data_parallel_size - 1)]


def replicate(first: Engine, trees: Sequence[dict]) -> list[Engine]:
    """Engines like `first` (its config, kernels, dtype and reloader), one per tree, replica i on the
    devices after those of replica i - 1."""
    tp = first.config.tensor_parallel_size
    meshes = replica_meshes(len(trees) + 1, tp)[1:]
    return [
        Engine(
            dataclasses.replace(first.model, params=tree),
            first.config,
            kernels=first.kernels,
            dtype=first.dtype,
            reload=first._reload,
            mesh=mesh,
        )
        for tree, mesh in zip(trees, meshes, strict=True)
    ]


class ReplicaRouter:
    """Drives several engines, one `AsyncEngine` thread each, with the surface the server uses:
    `generate`, `requantize` (every replica), `shutdown`, `num_waiting`, `num_running`, `stats`
    (one `EngineStats` the replicas share), `engine` (replica 0, for the model's facts)."""

    def __init__(self, engines: Sequence[Engine], *, max_waiting: int = MAX_WAITING):
        self.engine = engines[0]
        self.max_waiting = max_waiting
        self.stats = EngineStats()
        self.drivers = [AsyncEngine(e, max_waiting=max_waiting) for e in engines]
        for driver in self.drivers:
            driver.stats = self.stats
        self.in_flight = [0] * len(engines)
        self.routed = [0] * len(engines)  # requests sent to each replica so far

    @property
    def num_waiting(self) -> int:
        return sum(d.num_waiting for d in self.drivers)

    @property
    def num_running(self) -> int:
        return sum(d.num_running for d in self.drivers)

    def pick(self, prompt_ids: Sequence[int]) -> int:
        """The replica with the fewest requests in flight; among those, the one the prompt's first
        tokens hash to, or the next after it."""
        n = len(self.drivers)
        preferred = zlib.crc32(str(list(prompt_ids[:PREFIX_TOKENS])).encode()) % n
        return min(range(n), key=lambda i: (self.in_flight[i], (i - preferred) % n))

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        cache_key: Hashable = None,
        images: Any = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestUpdate]:
        """`AsyncEngine.generate` on the replica `pick` chooses."""
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"too many requests waiting ({self.num_waiting}); retry later")
        i = self.pick(prompt_ids)
        self.in_flight[i] += 1
        self.routed[i] += 1
        try:
            async for update in self.drivers[i].generate(
                prompt_ids,
                params,
                request_id=request_id,
                cache_key=cache_key,
                images=images,
                cache_salt=cache_salt,
            ):
                yield update
        finally:
            self.in_flight[i] -= 1

    async def requantize(self, fmt: str) -> Requantized:
        """Every replica re-quantized (one after another, so one replica's memory peak at a time)."""
        done = [await d.requantize(fmt) for d in self.drivers]
        return done[0]

    async def run_on_engine(self, fn: Callable[[Engine], T]) -> T:
        """`fn` on every replica's engine thread (adapters load and unload on all of them alike); the
        first replica's result."""
        done = [await d.run_on_engine(fn) for d in self.drivers]
        return done[0]

    async def run_on_each(self, fn: Callable[[Engine], T]) -> list[T]:
        """`fn` on every replica's engine thread; every replica's result."""
        return [await d.run_on_engine(fn) for d in self.drivers]

    async def end_requests(self, pick: Callable[[Engine], list[str]]) -> list[str]:
        """`AsyncEngine.end_requests` on every replica."""
        return [rid for d in self.drivers for rid in await d.end_requests(pick)]

    def shutdown(self) -> None:
        for driver in self.drivers:
            driver.shutdown()


def drive(engines: Sequence[Engine], *, max_waiting: int = MAX_WAITING) -> AsyncEngine | ReplicaRouter:
    """What a server drives: the engine's `AsyncEngine`, or a router over several replicas."""
    if len(engines) == 1:
        return AsyncEngine(engines[0], max_waiting=max_waiting)
    return ReplicaRouter(engines, max_waiting=max_waiting)
