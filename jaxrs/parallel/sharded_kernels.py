"""Kernels per shard: under a tensor-parallel mesh the kernels run inside `jax.shard_map`, each device
on its own part, so a Pallas kernel (which the compiler cannot partition) sees only its shard.

Attention runs on each device's own query heads and the KV heads they read; nothing crosses devices.
A packed matmul runs on each device's slice of the weight, as the weight's `SplitTensor` marking says:
split by output rows (column-parallel: q/k/v, gate/up, the vocabulary head), each device computes its
own slice of the outputs; split by input columns (row-parallel: o, down), each computes a partial sum
over its inputs and the partial sums are all-reduced (`psum`). Any registered implementation runs so.
A packed weight without the marking (placed some other way) takes the XLA implementation, which the
compiler partitions from the weight's placement whatever it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from jaxrs.parallel.mesh import TP
from jaxrs.parallel.split_tensor import INPUTS, OUTPUTS, SplitTensor
from jaxrs.quant.tensor import QuantizedTensor

HEADS = P(None, None, TP, None)  # q, k, v, attention output: [batch, tokens, heads, head_dim]
CACHE = P(None, None, None, TP, None)  # [layers, blocks, block_size, kv_heads, head_dim]
WHOLE = P()


def under_mesh() -> bool:
    """Whether the step being traced is split over several devices (`jax.set_mesh`; a data-parallel
    replica of one device has a mesh of one, and keeps every kernel as chosen) and the code traced
    now is not already one shard's (inside `shard_map`, where every kernel runs as chosen)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1 and TP not in mesh.manual_axes


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


MatmulFn = Callable[..., jax.Array]  # `fn(x, qt: QuantizedTensor, **options) -> y`, the `qmatmul` op


def split_matmul(fn: MatmulFn, fallback: MatmulFn) -> MatmulFn:
    """`fn(x, qt)` as a step traced under a mesh runs it: per shard for a `SplitTensor` (each device on
    its slice of the weight, row-parallel partial sums all-reduced), `fallback` for a weight without
    the marking; `fn` itself off a mesh and inside one shard's code."""

    @functools.wraps(fn)
    def call(x: jax.Array, qt: QuantizedTensor, **options) -> jax.Array:
        if not under_mesh():
            return fn(x, qt, **options)
        if not isinstance(qt, SplitTensor):
            return fallback(x, qt)
        shards = jax.sharding.get_abstract_mesh().shape[TP]
        names = list(qt.arrays)
        weight_spec = qt.partition(qt.ndim)  # every field is laid out [..., out, in // per]
        last = P(*(None,) * (x.ndim - 1), TP)  # split along x's and y's last axis
        x_spec, y_spec = {INPUTS: (last, WHOLE), OUTPUTS: (WHOLE, last), None: (WHOLE, WHOLE)}[qt.axis]

        def body(x, *arrays):
            y = fn(x, qt.local(dict(zip(names, arrays, strict=True)), shards), **options)
            return jax.lax.psum(y, TP) if qt.axis == INPUTS else y

        specs = (x_spec, *(weight_spec for _ in names))
        shard = jax.shard_map(body, in_specs=specs, out_specs=y_spec, check_vma=False)
        return shard(x, *(qt.arrays[n] for n in names))

    return call


PER_SHARD = {"paged_attention": paged_attention, "write_kv": write_kv}


def for_mesh(op: str, fn: Callable, xla: Callable[[], Callable]) -> Callable:
    """The implementation `fn` of `op` as a step traced under a mesh runs it: per shard (attention per
    head shard, `qmatmul` per weight slice, `xla()` for a packed weight placed without a marked split);
    unchanged off a mesh."""
    if not under_mesh():
        return fn
    if op == "qmatmul":
        return split_matmul(fn, xla())
    wrap = PER_SHARD.get(op)
    return fn if wrap is None else wrap(fn)
