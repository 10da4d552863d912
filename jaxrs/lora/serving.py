"""Loading and unloading adapters in a running engine: an adapter some unfinished request uses cannot be
unloaded (its slot would change under the request); the caller may wait and try again."""

from __future__ import annotations

from typing import Any

from jaxrs.errors import JaxrsError
from jaxrs.lora.slots import LoraSlots


class AdapterInUse(JaxrsError):
    """The adapter serves requests that have not finished."""


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


def unload_adapter(engine: Any, name: str) -> None:
    """Free adapter `name`'s slot; `AdapterInUse` while unfinished requests use it."""
    slots = slots_of(engine)
    slots.slot_of(name)  # unknown: an error naming what is loaded
    xlora = getattr(engine, "xlora", None)
    if xlora is not None and name in xlora.experts:
        raise JaxrsError(f"LoRA adapter {name!r} is an expert of the X-LoRA model served; it stays loaded")
    busy = users(engine, name)
    if busy:
        raise AdapterInUse(f"LoRA adapter {name!r} is in use by {len(busy)} unfinished request(s)")
    slots.unload(name)


def adapter_names(engine: Any) -> list[str]:
    return [] if engine.loras is None else engine.loras.names()
