"""Kernels per shard: under a tensor-parallel mesh the attention ops run inside `jax.shard_map`, each
device on its own query heads and the KV heads they read, so a Pallas kernel (which the compiler
cannot partition) sees only its shard, and nothing crosses devices.

Packed matmuls are different: a weight's split (output rows or input columns) is not visible at the
call, so under a mesh `qmatmul` takes the XLA implementation, which the compiler partitions from the
weights' placements (`shardings`), whatever the kernel choice; one device keeps the chosen kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from jaxrs.parallel.mesh import TP

HEADS = P(None, None, TP, None)  # q, k, v, attention output: [batch, tokens, heads, head_dim]
CACHE = P(None, None, None, TP, None)  # [layers, blocks, block_size, kv_heads, head_dim]
WHOLE = P()


def under_mesh() -> bool:
    """Whether the step being traced is split over several devices (`jax.set_mesh`; a data-parallel
    replica of one device has a mesh of one, and keeps every kernel as chosen)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _per_shard(fn: Callable, in_specs: tuple, out_specs, layer_at: int) -> Callable:
    """`fn` under `shard_map`; the layer index (argument `layer_at`) passes as a replicated array, or
    closed over when it is a Python int (an unrolled layer)."""

    @functools.wraps(fn)
    def call(*args, **options):
        args = list(args)
        specs = list(in_specs)
        if isinstance(args[layer_at], int):
            layer = args.pop(layer_at)
            specs.pop(layer_at)

            def body(*rest):
                rest = list(rest)
                rest.insert(layer_at, layer)
                return fn(*rest, **options)

        else:

            def body(*all_args):
                return fn(*all_args, **options)

        return jax.shard_map(body, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)

    return call


def paged_attention(fn: Callable) -> Callable:
    """`paged_attention(q, k_cache, v_cache, layer, block_tables, positions, context_lens, **options)`
    per head shard."""
    specs = (HEADS, CACHE, CACHE, WHOLE, WHOLE, WHOLE, WHOLE)
    return _per_shard(fn, specs, HEADS, layer_at=3)


def write_kv(fn: Callable) -> Callable:
    """`write_kv(k_cache, v_cache, layer, k, v, slot_mapping)` per head shard."""
    specs = (CACHE, CACHE, WHOLE, HEADS, HEADS, WHOLE)
    return _per_shard(fn, specs, (CACHE, CACHE), layer_at=2)


PER_SHARD = {"paged_attention": paged_attention, "write_kv": write_kv}


def for_mesh(op: str, fn: Callable, xla: Callable[[], Callable]) -> Callable:
    """The implementation `fn` of `op` as a step traced under a mesh runs it: per shard for the
    attention ops, `xla()` (the compiler-partitioned reference) for `qmatmul`; unchanged off a mesh."""
    if not under_mesh():
        return fn
    if op == "qmatmul":
        return xla()
    wrap = PER_SHARD.get(op)
    return fn if wrap is None else wrap(fn)
