"""The adapters an engine serves, each in a fixed slot of stacks that live in the model's parameters.

Every adapted projection's weight becomes a `LoraWeight` whose A/B stacks have `max_loras` slots of one
power-of-two rank; an adapter loads by writing its (padded) weights into a free slot and unloads by
zeroing it, so the steps' parameter shapes never change and nothing recompiles. Each load bumps a
generation counter, and a request's prefix-cache key holds (adapter name, generation): two adapters, or
two loads of one name, never share KV blocks. An adapter being unloaded is first retired: new requests
cannot name it while the requests already running with it finish on its slot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.lora.adapter import LoraAdapter, Target, adaptable_targets, read_adapter
from jaxrs.lora.config import LoraConfig
from jaxrs.lora.weight import LoraWeight
from jaxrs.models.decoder import stack_layers
from pallas_kernels.shapes import next_power_of_2

log = logging.getLogger("jaxrs")

MIN_RANK = 8  # the stacks' smallest rank bucket


@dataclasses.dataclass(frozen=True)
class Loaded:
    adapter: LoraAdapter
    slot: int
    generation: int


class LoraSlots:
    """Adapters by name in fixed slots; `attach` puts the stacks into a parameter tree, `load`/`unload`
    write them."""

    def __init__(self, config: LoraConfig, cfg: ModelConfig, dtype: jnp.dtype):
        self.config, self.cfg, self.dtype = config, cfg, jnp.dtype(dtype)
        self.rank = next_power_of_2(config.max_lora_rank, MIN_RANK)
        self.loaded: dict[str, Loaded] = {}
        self.retired: set[str] = set()  # being unloaded: running requests keep the slot, new ones cannot
        self._generation = 0
        self.params: dict | None = None
        start = [read_adapter(n, p, cfg, config.max_lora_rank) for n, p in config.adapters]
        shapes = {target: shape for target, shape in adaptable_targets(cfg).values()}
        wanted = set(shapes) if config.runtime else {t for a in start for t in a.weights}
        self.targets: dict[Target, tuple[int, ...]] = {t: shapes[t] for t in sorted(wanted)}
        self._start = start

    # -- the stacks in the parameter tree ------------------------------------------------------------
    def attach(self, params: dict) -> None:
        """Wrap each adapted projection's weight of `params` (stacked layers) in a `LoraWeight` with zero
        stacks, then write the loaded adapters (the start ones the first time). In place."""
        stack_layers(params)
        layers = params["layers"]
        slots, rank, num_layers = self.config.max_loras, self.rank, self.cfg.num_layers
        for (group, proj), (*experts, out_features, in_features) in self.targets.items():
            node = layers[group][proj]
            base = node["weight"]
            if isinstance(base, LoraWeight):
                base = base.base
            a = jnp.zeros((num_layers, slots, *experts, rank, in_features), self.dtype)
            b = jnp.zeros((num_layers, slots, *experts, out_features, rank), self.dtype)
            node["weight"] = LoraWeight(base, a, b)
        self.params = params
        for adapter in self._start:
            self._place(adapter)
        self._start = []
        for entry in self.loaded.values():
            self._write(entry.slot, entry.adapter)

    def _weights(self) -> Iterator[tuple[Target, int | None, dict]]:
        """(target, layer index or None for stacked, the dict holding its `LoraWeight` as "weight")."""
        layers = self.params["layers"]
        for group, proj in self.targets:
            if isinstance(layers, tuple):
                for i, layer in enumerate(layers):
                    yield (group, proj), i, layer[group][proj]
            else:
                yield (group, proj), None, layers[group][proj]

    def _write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Slot `slot` of every stack := the adapter's weights (zeros where it has none, or for None)."""
        for target, layer, node in self._weights():
            w: LoraWeight = node["weight"]
            axis = 1 if layer is None else 0  # the slot axis, after the layer axis of stacked layers
            a_new = np.zeros(w.a.shape[:axis] + w.a.shape[axis + 1 :], np.float32)
            b_new = np.zeros(w.b.shape[:axis] + w.b.shape[axis + 1 :], np.float32)
            if adapter is not None and target in adapter.weights:
                a, b = adapter.weights[target]
                if layer is not None:
                    a, b = a[layer], b[layer]
                a_new[..., : a.shape[-2], :] = a
                b_new[..., : b.shape[-1]] = b
            index = (slice(None), slot) if layer is None else (slot,)
            node["weight"] = dataclasses.replace(
                w, a=w.a.at[index].set(a_new.astype(w.a.dtype)), b=w.b.at[index].set(b_new.astype(w.b.dtype))
            )

    # -- adapters --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The adapters new requests may name (retired ones left out)."""
        return [n for n in self.loaded if n not in self.retired]

    def retire(self, name: str) -> None:
        """Refuse new requests for `name` from now on; its slot stays until `unload`."""
        self._entry(name)
        if name in self.retired:
            raise JaxrsError(f"LoRA adapter {name!r} is already being unloaded")
        self.retired.add(name)

    def restore(self, name: str) -> None:
        """Serve a retired adapter again (its unload was given up)."""
        self.retired.discard(name)

    def _place(self, adapter: LoraAdapter) -> Loaded:
        if adapter.name in self.loaded:
            being = " (and being unloaded)" if adapter.name in self.retired else ""
            raise JaxrsError(f"a LoRA adapter named {adapter.name!r} is already loaded{being}")
        missing = sorted(".".join(t) for t in adapter.weights if t not in self.targets)
        if missing:
            raise JaxrsError(
                f"LoRA adapter {adapter.name!r} targets {', '.join(missing)}, which this engine does not"
                f" adapt (it adapts {', '.join('.'.join(t) for t in self.targets)}; enable runtime LoRA"
                " to adapt every projection)"
            )
        used = {entry.slot for entry in self.loaded.values()}
        free = [s for s in range(self.config.max_loras) if s not in used]
        if not free:
            raise JaxrsError(
                f"all {self.config.max_loras} LoRA slots are taken ({', '.join(self.loaded)}); unload one"
                " or raise max_loras"
            )
        self._generation += 1
        entry = self.loaded[adapter.name] = Loaded(adapter, free[0], self._generation)
        if self.params is not None:
            self._write(entry.slot, adapter)
        log.info(
            "LoRA adapter %s (rank %d) in slot %d: %s", adapter.name, adapter.rank, entry.slot, adapter.path
        )
        return entry

    def load(self, name: str, path: str) -> Loaded:
        """Read the adapter at `path` and write it into a free slot."""
        return self._place(read_adapter(name, path, self.cfg, self.config.max_lora_rank))

    def unload(self, name: str) -> None:
        """Zero the adapter's slot and forget it (the caller makes sure no request uses it)."""
        entry = self._entry(name)
        if self.params is not None:
            self._write(entry.slot, None)
        del self.loaded[name]
        self.retired.discard(name)
        log.info("LoRA adapter %s unloaded from slot %d", name, entry.slot)

    def _entry(self, name: str) -> Loaded:
        try:
            return self.loaded[name]
        except KeyError:
            known = ", ".join(self.loaded) or "none"
            raise JaxrsError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})") from None

    def slot_of(self, name: str | None) -> int:
        """The slot a request naming `name` reads (-1: the base model)."""
        return -1 if name is None else self._entry(name).slot

    def cache_key(self, name: str, extra: object = None) -> tuple:
        """The prefix-cache key of a request using adapter `name`: its name and load generation (an error
        for a retired adapter: no new request may use it)."""
        entry = self._entry(name)
        if name in self.retired:
            raise JaxrsError(f"LoRA adapter {name!r} is being unloaded; new requests cannot use it")
        return ("lora", name, entry.generation, extra)
