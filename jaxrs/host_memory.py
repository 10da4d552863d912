"""This process's resident memory, and handing freed heap memory back to the system.

On CPU the weights, the KV pool and the compiled steps all live in this process's resident memory
(RSS), which is what a host running the engine beside other work has to spare. Linux only (`/proc`);
elsewhere the figures are None and `release_freed` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

STATUS = Path("/proc/self/status")
MAPS = Path("/proc/self/maps")
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def _status_kib(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """The process's resident memory now (VmRSS)."""
    return _status_kib("VmRSS")


def peak_resident_bytes() -> int | None:
    """The most resident memory the process has held so far (VmHWM)."""
    return _status_kib("VmHWM")


def available_bytes() -> int | None:
    """Memory the system could give this process now without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_maps() -> int | None:
    """How many memory maps (address ranges) the process holds now."""
    try:
        with MAPS.open("rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


@functools.cache
def memory_map_limit() -> int | None:
    """The most memory maps the system lets a process hold (`vm.max_map_count`): past it every `mmap`
    fails, a compiler's included."""
    try:
        return int(MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`). Loading frees many
    tensor-sized host buffers whose pages glibc would otherwise keep, counted in RSS, for reuse."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
