"""Step executables, each compiled once per call signature by whichever thread needs it first.

A step compiles from `jit(...).lower(...).compile()` on the shapes of the parameters and of the KV pool,
never on the arrays themselves: a compile runs nothing and never touches the live (donated) KV cache, so
the warm-up may compile in a background thread while the engine steps. A shape the engine needs while
another thread compiles it waits for that compile rather than starting its own.

Each compile is kept lean on the host (`lean_compile`): a served process's peak resident memory comes
during its step compiles, not its steps (bench/RESULTS.md, "Serving memory").

The executables held stay within a share of the system's limit on memory maps (`MAP_SHARE`): past it the
least recently used are dropped, to be compiled again (or read from the compilation cache) when needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, NamedTuple

import jax

from jaxrs.host_memory import memory_map_limit, memory_maps, release_freed

log = logging.getLogger("jaxrs")

# The share of the system's limit on a process's memory maps (Linux `vm.max_map_count`, 65,530 by default)
# that the executables held may fill. XLA:CPU maps each kernel of an executable on pages of its own (code,
# constants, data: three maps), about 360 maps for one of the demo model's decode steps, so the server's
# whole warm-up (then 187 shapes; 48 now) went past the limit, and the next compile failed to map its code
# ("LLVM compilation error: Cannot allocate memory") and crashed the process. Past this share the least
# recently used executables are dropped. Each also holds about 10 MiB of host memory, which this bounds too.
MAP_SHARE = 0.5


class StepCall(NamedTuple):
    """One step call's signature: the step (`prefill`, `decode`, `score`), its arguments after the
    parameters and the KV pool (arrays or their shapes), its static arguments, and a short label for logs."""

    kind: str
    args: tuple
    statics: Mapping[str, Hashable]
    label: tuple


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and placements of a tree of arrays, for lowering without the arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def signature(call: StepCall) -> tuple:
    """What the executable of `call` depends on: the step, its static arguments, its arguments' shapes."""
    leaves, tree = jax.tree.flatten(call.args)
    shapes = tuple((a.shape, str(a.dtype)) for a in leaves)
    return call.kind, tuple(sorted(call.statics.items())), tree, shapes


@contextlib.contextmanager
def lean_compile(step: Any) -> Iterator[None]:
    """Compile `step` (a jitted function) inside this, holding less host memory during and after.

    Before: the C heap's free pages go back to the system (the steps' freed temporaries sit in the
    executor threads' heaps, where the compiling thread cannot reuse them). After: `step`'s traces and
    lowerings are dropped (the caller keeps the executable and never traces that shape again, so JAX's
    caches would hold them for nothing), then the heap again: loading an executable from the compilation
    cache takes about twice what stays resident, and a compile far more.
    """
    release_freed()
    try:
        yield
    finally:
        step.clear_cache()
        release_freed()


class CompiledSteps:
    """The executables compiled for one runner (its parameters' and KV pool's shapes)."""

    def __init__(self, steps: Any, params: Any, kv: Any, mesh: jax.sharding.Mesh | None = None):
        self._steps = steps  # runner.Steps: the jitted functions
        self._mesh = mesh  # a tensor-parallel model's: the steps trace under it
        self._params, self._kv = abstract(params), abstract(kv)
        self._lock = threading.Lock()
        self._entries: dict[tuple, Future] = {}
        self._labels: list[tuple] = []  # compiled shapes, in order
        self._recent: OrderedDict[tuple, None] = OrderedDict()  # compiled ones, least recently used first
        self.seconds = 0.0  # compile time, all threads
        self.dropped = 0  # executables dropped to stay within the memory maps' share
        self._maps_before = memory_maps() or 0  # the process's maps before any executable of these

    @property
    def labels(self) -> list[tuple]:
        """`(kind, *label)` of each shape compiled so far."""
        with self._lock:
            return list(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def has(self, call: StepCall) -> bool:
        """Whether `call`'s executable is compiled (or compiling)."""
        return self.missing([signature(call)]) == 0

    def missing(self, keys: list[tuple]) -> int:
        """How many of these signatures no thread has compiled or started compiling."""
        with self._lock:
            return sum(key not in self._entries for key in keys)

    def get(self, call: StepCall, why: str = "on first use") -> Callable:
        """`call`'s executable: compiled now on this thread, unless another compiled it or is compiling it
        (then this waits for that one). A failed compile is raised to every waiter and tried again on the
        next `get`."""
        key = signature(call)
        with self._lock:
            entry = self._entries.get(key)
            mine = entry is None
            if mine:
                entry = self._entries[key] = Future()
            elif key in self._recent:
                self._recent.move_to_end(key)
        if mine:
            self._compile(call, key, entry, why)
            self._fit_maps(keep=key)
        return entry.result()

    def map_share(self) -> float | None:
        """The process's memory maps as a share of the system's limit (None where unknown)."""
        maps, limit = memory_maps(), memory_map_limit()
        return None if maps is None or not limit else maps / limit

    def _fit_maps(self, keep: tuple) -> None:
        """Past `MAP_SHARE` of the memory maps' limit, drop the least recently used executables (not `keep`)
        that take the process back under it, judging each to hold the maps added since, averaged."""
        share = self.map_share()
        if share is None or share <= MAP_SHARE:
            return
        limit = memory_map_limit()
        with self._lock:
            held = [k for k in self._recent if k != keep]
            each = max(1.0, (share * limit - self._maps_before) / max(1, len(self._recent)))
            drop = held[: math.ceil((share - MAP_SHARE) * limit / each)]
            for k in drop:
                del self._entries[k], self._recent[k]
            self.dropped += len(drop)
        if not drop:  # nothing of these to drop (the maps are another set's, or the process's own)
            return
        log.warning(
            "compiled steps hold %d of the %d memory maps this system allows a process "
            "(vm.max_map_count): dropped the %d least recently used, which compile again when needed",
            round(share * limit),
            limit,
            len(drop),
        )

    def _compile(self, call: StepCall, key: tuple, entry: Future, why: str) -> None:
        began = time.perf_counter()
        try:
            step = getattr(self._steps, call.kind)
            with (
                jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext(),
                lean_compile(step),
            ):
                executable = step.lower(self._params, self._kv, *call.args, **call.statics).compile()
        except BaseException as error:
            with self._lock:
                del self._entries[key]
            entry.set_exception(error)
            return
        seconds = time.perf_counter() - began
        with self._lock:
            self._labels.append((call.kind, *call.label))
            self._recent[key] = None
            self.seconds += seconds
            count = len(self._labels)
        entry.set_result(executable)
        log.log(
            logging.INFO if why == "on first use" else logging.DEBUG,
            "compiled %s %s in %.2f s %s (%d shapes)",
            call.kind,
            call.label,
            seconds,
            why,
            count,
        )
