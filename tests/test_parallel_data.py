"""Data parallelism through the server: two replicas on a simulated 2-device CPU mesh (in a child
process, `tests/data_parallel.py`) answer 32 concurrent requests, split between them, with the tokens
one replica gives alone."""

from __future__ import annotations

import asyncio

from jaxrs.engine.sampling import SamplingParams
from jaxrs.parallel.data_parallel import ReplicaRouter
from tests.simulated_devices import run_json


class FakeDriver:
    """Records what the router hands a replica."""

    def __init__(self):
        self.seen, self.calls = [], 0
        self.num_waiting = self.num_running = 0

    async def generate(
        self, prompt_ids, params, *, request_id=None, cache_key=None, images=None, cache_salt=None
    ):
        self.seen.append((prompt_ids, images))
        yield "update"

    async def run_on_engine(self, fn):
        self.calls += 1
        return fn(self)

    async def end_requests(self, pick):
        return pick(self)


def router_over(drivers: list[FakeDriver]) -> ReplicaRouter:
    router = ReplicaRouter.__new__(ReplicaRouter)  # no engines: only the routing is under test
    router.max_waiting, router.drivers = 4, drivers
    router.in_flight, router.routed = [0] * len(drivers), [0] * len(drivers)
    return router


def test_images_and_engine_calls_reach_the_replicas():
    drivers = [FakeDriver(), FakeDriver()]
    router = router_over(drivers)

    async def go():
        updates = [u async for u in router.generate([1, 2, 3], SamplingParams(), images="placed")]
        result = await router.run_on_engine(lambda driver: id(driver))
        return updates, result

    updates, result = asyncio.run(go())
    assert updates == ["update"]
    assert [seen for d in drivers for seen in d.seen] == [([1, 2, 3], "placed")]
    assert [d.calls for d in drivers] == [1, 1]  # an adapter load reaches every replica
    assert result == id(drivers[0])


def test_an_adapter_unload_asks_every_replica():
    """An unload polls and ends the requests of every replica, not only the first one's."""
    drivers = [FakeDriver(), FakeDriver()]
    router = router_over(drivers)

    async def go():
        counts = await router.run_on_each(lambda driver: drivers.index(driver) + 2)
        return counts, await router.end_requests(lambda driver: [f"r{drivers.index(driver)}"])

    assert asyncio.run(go()) == ([2, 3], ["r0", "r1"])


def test_two_replicas_serve_32_requests(tmp_path):
    out = run_json("tests.data_parallel", [str(tmp_path / "model")], devices=2)
    assert out["devices"] == ["cpu:0", "cpu:1"]  # each replica on its own device
    assert out["served"] == out["alone"]
    assert sum(out["routed"]) == 32
    assert min(out["routed"]) >= 8, out["routed"]  # both replicas took a real share
