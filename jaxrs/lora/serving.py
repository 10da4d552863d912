"""Loading and unloading adapters in a running engine.

Unloading an adapter that unfinished requests use retires it first (new requests naming it are refused
at once, as vLLM drops the name), waits a bounded time for the requests already running with it to
finish on its slot, then frees the slot. If they have not finished by then the unload is given up and
the adapter served again (`AdapterInUse`), unless `force` ends them (finish reason "abort").
The engine-side steps run between steps (on the engine thread when a server drives the engine);
`unload_adapter` waits by stepping the engine itself, `unload_when_idle` by polling a driver.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jaxrs.errors import JaxrsError
from jaxrs.lora.slots import LoraSlots

UNLOAD_WAIT_S = 120.0  # how long an unload waits for the adapter's running requests by default
_POLL_S = 0.02


class AdapterInUse(JaxrsError):
    """The adapter serves requests that did not finish within the unload's wait."""


def slots_of(engine: Any) -> LoraSlots:
    if engine.loras is None:
        raise JaxrsError("this engine serves no LoRA adapters (start it with adapters or runtime LoRA)")
    return engine.loras


def users(engine: Any, name: str) -> list[str]:
    """Ids of the unfinished requests running with adapter `name`."""
    return [rid for rid, r in engine.requests.items() if not r.finished and r.seqs[0].params.lora == name]


def load_adapter(engine: Any, name: str, path: str) -> None:
    """Read the adapter at `path` into a free slot under `name` (no step recompiles)."""
    slots_of(engine).load(name, path)


def begin_unload(engine: Any, name: str) -> int:
    """Retire adapter `name` (an error naming what is loaded if it is not); returns how many running
    requests still use it."""
    slots = slots_of(engine)
    slots.slot_of(name)  # unknown: an error naming what is loaded
    xlora = getattr(engine, "xlora", None)
    if xlora is not None and name in xlora.experts:
        raise JaxrsError(f"LoRA adapter {name!r} is an expert of the X-LoRA model served; it stays loaded")
    slots.retire(name)
    return len(users(engine, name))


def cancel_unload(engine: Any, name: str) -> None:
    slots_of(engine).restore(name)


def finish_unload(engine: Any, name: str) -> None:
    """Free the retired adapter's slot once no request uses it."""
    busy = users(engine, name)
    if busy:
        raise AdapterInUse(f"LoRA adapter {name!r} is in use by {len(busy)} unfinished request(s)")
    slots_of(engine).unload(name)


def _in_use(name: str, count: int, timeout: float) -> AdapterInUse:
    return AdapterInUse(
        f"LoRA adapter {name!r} is still in use by {count} unfinished request(s) after {timeout:g} s;"
        " it stays loaded (wait longer, or force the unload to end those requests)"
    )


def unload_adapter(engine: Any, name: str, *, timeout: float = UNLOAD_WAIT_S, force: bool = False) -> None:
    """Unload adapter `name`, stepping `engine` until the requests using it finish (at most `timeout`
    seconds); then `force` aborts those left, else the adapter stays and `AdapterInUse` is raised."""
    begin_unload(engine, name)
    try:
        deadline = time.monotonic() + timeout
        while users(engine, name) and time.monotonic() < deadline:
            engine.step()
        busy = users(engine, name)
        if busy and not force:
            raise _in_use(name, len(busy), timeout)
        for rid in busy:
            engine.abort(rid)
    except BaseException:
        cancel_unload(engine, name)
        raise
    finish_unload(engine, name)


async def unload_when_idle(
    driver: Any, name: str, *, timeout: float = UNLOAD_WAIT_S, force: bool = False
) -> None:
    """`unload_adapter` through an engine driver (`AsyncEngine` or a replica router): the adapter is
    retired on every engine at once, then polled between steps until its requests finish; `force`
    ends those left after `timeout`, each client told by a last update (finish reason "abort")."""

    await driver.run_on_each(lambda engine: begin_unload(engine, name))
    try:
        deadline = time.monotonic() + timeout
        while busy := sum(await driver.run_on_each(lambda engine: len(users(engine, name)))):
            if time.monotonic() >= deadline:
                if not force:
                    raise _in_use(name, busy, timeout)
                await driver.end_requests(lambda engine: users(engine, name))
                continue
            await asyncio.sleep(_POLL_S)
    except BaseException:
        await driver.run_on_each(lambda engine: cancel_unload(engine, name))
        raise
    await driver.run_on_each(lambda engine: finish_unload(engine, name))


def adapter_names(engine: Any) -> list[str]:
    """The adapters new requests may name."""
    return [] if engine.loras is None else engine.loras.names()
