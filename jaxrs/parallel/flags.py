"""`jaxrs serve`'s flags for serving over several devices or hosts (no JAX import: the CLI parses
before JAX starts, and `jax.distributed` must start before anything touches a device)."""

from __future__ import annotations

import argparse


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="D",
        help="D engine replicas, each on its own --tensor-parallel-size devices, behind one server",
    )
    hosts = p.add_argument_group("several hosts (jax.distributed; process 0 serves HTTP)")
    hosts.add_argument(
        "--coordinator-address", metavar="HOST:PORT", help="process 0's address, on every host"
    )
    hosts.add_argument("--num-processes", type=int, metavar="P", help="processes in all (one per host)")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..P-1")
