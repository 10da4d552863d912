"""Serving one model from several processes (one per host) with `jax.distributed`: one global mesh
over every process's devices, process 0 serving HTTP and scheduling, the others following.

Every process must launch the same jitted step with the same inputs, so process 0 broadcasts each
step call its runner makes (the scheduler's decision, as the step's kind, host arrays and static
arguments) through the coordination service's key-value store, and the followers run it on their
shards. A step goes ahead only once every follower has taken it (`Leader.publish` waits, up to
`timeout_s`), so a follower that has gone away stops process 0 with a `FollowerLost` error naming it,
instead of a collective waiting forever.

The store is reached through a `Transport` (`CoordinatorStore` over `jax.distributed`'s client; tests
use a dict), so the protocol is testable without several processes.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
from collections.abc import Callable
from typing import Protocol

import jax

from jaxrs.engine.compiled_steps import StepCall
from jaxrs.engine.engine import Engine
from jaxrs.errors import JaxrsError

log = logging.getLogger("jaxrs")

STEP = "jaxrs/step/{}"  # step n's call, from process 0
TAKEN = "jaxrs/taken/{}/{}"  # process p has taken step n
STOP = "stop"


class FollowerLost(JaxrsError):
    """A follower process stopped answering; every process must be restarted."""


class Transport(Protocol):
    """A key-value store every process reaches."""

    def put(self, key: str, value: str) -> None: ...

    def get(self, key: str, timeout_s: float) -> str:
        """The value at `key`, waiting for it up to `timeout_s`; raises TimeoutError after."""
        ...

    def delete(self, key: str) -> None: ...


class CoordinatorStore:
    """The key-value store of `jax.distributed`'s coordination service (process 0 hosts it)."""

    def __init__(self):
        from jax._src import distributed  # the client has no public accessor

        self.client = distributed.global_state.client
        if self.client is None:
            raise JaxrsError("jax.distributed is not initialized (see multihost.initialize)")

    def put(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value)

    def get(self, key: str, timeout_s: float) -> str:
        try:
            return self.client.blocking_key_value_get(key, int(timeout_s * 1000))
        except Exception as error:  # XlaRuntimeError: DEADLINE_EXCEEDED, or the service is gone
            if "DEADLINE_EXCEEDED" in str(error) or "timed out" in str(error).lower():
                raise TimeoutError(key) from None
            raise

    def delete(self, key: str) -> None:
        self.client.key_value_delete(key)


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the processes (before anything touches a device). On CPU the collectives go through gloo."""
    if not 0 <= process_id < num_processes:
        raise JaxrsError(f"--process-id must be in 0..{num_processes - 1}, not {process_id}")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except Exception as error:
        raise JaxrsError(
            f"could not join the processes at {coordinator_address} as process {process_id} of "
            f"{num_processes}: {str(error).splitlines()[0]}"
        ) from None
    log.info(
        "process %d of %d: %d local devices, %d in all",
        process_id,
        num_processes,
        jax.local_device_count(),
        jax.device_count(),
    )


def encode(message: object) -> str:
    return base64.b64encode(pickle.dumps(message)).decode()


def decode(text: str) -> object:
    return pickle.loads(base64.b64decode(text))


class Leader:
    """Process 0's side: `publish` each step call before running it."""

    def __init__(self, transport: Transport, followers: list[int], timeout_s: float = 60.0):
        self.transport, self.followers, self.timeout_s = transport, followers, timeout_s
        self.step = 0

    def publish(self, call: StepCall | str) -> None:
        """Hand step `call` (or STOP) to every follower and wait until each has taken it."""
        n = self.step
        self.transport.put(STEP.format(n), encode(call))
        for p in self.followers:
            try:
                self.transport.get(TAKEN.format(p, n), self.timeout_s)
            except TimeoutError:
                raise FollowerLost(
                    f"process {p} did not take step {n} within {self.timeout_s:g} s: it has stopped or "
                    "cannot reach process 0; restart every process"
                ) from None
            self.transport.delete(TAKEN.format(p, n))
        if n:
            self.transport.delete(STEP.format(n - 1))
        self.step += 1

    def stop(self) -> None:
        """Tell the followers to return."""
        self.publish(STOP)


def follow(
    run: Callable[[StepCall], None], transport: Transport, process_id: int, poll_s: float = 5.0
) -> int:
    """A follower's loop: take each step call in order, say so, run it; return at STOP. Returns the
    number of steps run. Waiting has no end (a server may idle for hours): a lost process 0 ends it
    with the transport's error."""
    n = 0
    while True:
        try:
            message = decode(transport.get(STEP.format(n), poll_s))
        except TimeoutError:
            continue
        transport.put(TAKEN.format(process_id, n), "1")
        if message == STOP:
            return n
        run(message)
        n += 1


def run_step(engine: Engine) -> Callable[[StepCall], None]:
    """A follower's step: the call on its runner's shards, waited for."""
    return lambda call: engine.runner._run(call, jax.block_until_ready)


def lead(engine: Engine, transport: Transport, timeout_s: float = 60.0) -> Leader:
    """Make `engine` (process 0's) publish every step call; re-quantizing is refused (the followers
    would keep the old weights)."""
    leader = Leader(transport, [p for p in range(jax.process_count()) if p], timeout_s)
    engine.runner.on_step = leader.publish

    def refuse(fmt: str):
        raise JaxrsError("re-ISQ is not available while serving from several processes")

    engine.requantize = refuse  # type: ignore[method-assign]
    return leader


def join(args) -> int | None:
    """From `jaxrs serve`'s flags: join the other processes and return this one's index, or None when
    serving alone. Every process must size its KV pool alike, so the size must be given."""
    given = [args.coordinator_address, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise JaxrsError(
            "serving from several processes takes --coordinator-address, --num-processes and --process-id"
        )
    if not (args.kv_cache_tokens or args.kv_cache_mb):
        raise JaxrsError(
            "serving from several processes needs --kv-cache-tokens or --kv-cache-mb (every process "
            "must size its KV pool alike)"
        )
    if args.data_parallel_size != 1:
        raise JaxrsError(
            "--data-parallel-size is for one process; several hosts run one model (tensor parallel)"
        )
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    return args.process_id


def serve_as_follower(engine: Engine) -> int:
    """A follower's life: run process 0's steps until it stops."""
    log.info("process %d follows process 0's steps", jax.process_index())
    steps = follow(run_step(engine), CoordinatorStore(), jax.process_index())
    log.info("process 0 stopped after %d steps", steps)
    return 0


def serve_as_leader(engine: Engine) -> Leader:
    """Process 0's engine publishing its steps; a lost follower ends the process with its message."""
    leader = lead(engine, CoordinatorStore())
    publish = leader.publish

    def publish_or_exit(call: StepCall | str) -> None:
        try:
            publish(call)
        except FollowerLost as error:
            log.error("%s", error)
            os._exit(1)

    engine.runner.on_step = publish_or_exit
    return leader
