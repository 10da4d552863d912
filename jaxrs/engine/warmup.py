"""Compiles a runner's step shapes ahead of use: all of them now, or the first few now and the rest in a
background thread while the engine already serves.

A shape the engine needs before the background reaches it compiles on first use; one the background is
compiling is waited for, never compiled twice (see `CompiledSteps`). The background thread runs at a
lower CPU priority, so on a small machine serving comes first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from jaxrs.engine.compiled_steps import CompiledSteps, StepCall, signature

log = logging.getLogger("jaxrs")

# Shapes compiled at once before serving. XLA compiles one executable mostly on one core, so two at a time
# use a 2-core machine's both cores (bench/RESULTS.md, "Ready in seconds").
FOREGROUND_THREADS = max(1, min(4, os.cpu_count() or 1))

# How much lower the background compiler's CPU priority is than the engine's (Linux `nice`, per thread).
BACKGROUND_NICENESS = 10

# The background stops once the process holds this share of the memory maps the system allows it: short of
# `compiled_steps.MAP_SHARE`, where executables start to be dropped, so the likeliest shapes it compiled
# first are not dropped for the rarer ones after them (those compile on first use).
WARMUP_MAP_SHARE = 0.4


class Warmup:
    """One warm-up of `calls` (likeliest first), of which the first `first` come before serving."""

    def __init__(self, compiled: CompiledSteps, calls: Sequence[StepCall], first: int):
        self.compiled = compiled
        self.calls = list(calls)
        self._keys = [signature(call) for call in self.calls]
        self.first = first
        self._stop = threading.Event()
        self._done = threading.Event()
        self._left_to_first_use = False
        self.thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Planned shapes not compiled (nor compiling) yet; none once the warm-up has left the rest to
        first use (`WARMUP_MAP_SHARE`)."""
        return 0 if self._left_to_first_use else self.compiled.missing(self._keys)

    def run(self, *, background: bool) -> None:
        """Compile the first shapes (`background`) or all of them now; with `background`, start a thread
        that compiles the rest and return."""
        now = self.calls[: self.first] if background else self.calls
        before, began = len(self.compiled), time.perf_counter()
        self._compile_now(now)
        rest = self.calls[len(now) :]
        log.info(
            "warm-up: %d step shapes ready in %.1f s (%d compiled by the warm-up)%s",
            len(now),
            time.perf_counter() - began,
            len(self.compiled) - before,
            f"; compiling {len(rest)} more in the background" if rest else "",
        )
        if not rest:
            self._done.set()
            return
        self.thread = threading.Thread(
            target=self._background, args=(rest,), name="jaxrs-warmup", daemon=True
        )
        self.thread.start()

    def _compile_now(self, calls: list[StepCall]) -> None:
        from tqdm.auto import tqdm

        with (
            ThreadPoolExecutor(FOREGROUND_THREADS, thread_name_prefix="jaxrs-compile") as pool,
            tqdm(total=len(calls), desc="Compiling", unit="shape", leave=False) as bar,
        ):
            for done in as_completed([pool.submit(self.compiled.get, c, "in the warm-up") for c in calls]):
                done.result()  # a failed compile fails the warm-up, naming XLA's error
                bar.update()

    def _background(self, calls: list[StepCall]) -> None:
        try:  # Linux: a thread's own niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        except (AttributeError, OSError):
            pass
        began, compiled_here = time.perf_counter(), 0
        for call in calls:
            if self._stop.is_set():
                log.info("warm-up stopped with %d step shapes left", self.pending)
                break
            share = self.compiled.map_share()
            if share is not None and share > WARMUP_MAP_SHARE:
                log.warning(
                    "warm-up stopped with %d step shapes left, which compile on first use: the process holds "
                    "%.0f%% of the memory maps this system allows it (vm.max_map_count), most of them the %d "
                    "compiled steps' code",
                    self.pending,
                    100 * share,
                    len(self.compiled),
                )
                self._left_to_first_use = True
                break
            if self.compiled.has(call):  # the engine needed it first
                continue
            try:
                self.compiled.get(call, "in the background")
                compiled_here += 1
            except Exception:  # serving goes on; a step needing this shape compiles it (and fails) then
                log.exception("background compile of %s %s failed", call.kind, call.label)
        else:
            log.info(
                "warm-up complete: %d step shapes in %.1f s in the background (%d more were compiled on "
                "first use meanwhile); %d compiled in all",
                compiled_here,
                time.perf_counter() - began,
                len(calls) - compiled_here,
                len(self.compiled),
            )
        self._done.set()

    def stop(self) -> None:
        """Stop the background thread after the compile in progress; returns at once."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every planned shape has compiled (or the warm-up stopped); False on timeout."""
        return self._done.wait(timeout)
