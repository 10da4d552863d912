"""Tensor-parallel placement of the parameter pytree and the KV cache (Megatron-style, as vLLM splits
them): q/k/v and gate/up column-parallel (their output rows split), o and down row-parallel (their
input columns split, the partial sums all-reduced), the embedding and the head split by vocabulary,
Mixtral's experts split like the MLP (each expert's hidden units), norms and the router replicated.

The KV cache is split by KV heads. With more devices than KV heads, each KV head is repeated until
there is one per device (vLLM's way): the k/v projections' rows are duplicated, so every device holds
and writes the heads its query heads read, and the model runs with `num_kv_heads = devices`.

Packed weights are split on the same axes; an input (row-parallel) split must fall on whole blocks
of the format, else loading stops with an error naming the tensor. Each is placed as a `SplitTensor`
marking its split, so its matmul runs per shard (`sharded_kernels`). The rest of the step is
partitioned by the compiler (GSPMD) from these placements; `pin_step_outputs` fixes the two
placements the engine relies on between calls: the cache keeps its head split (it is donated back
next call) and the logits are replicated, so every device samples the same token from the same
uniform draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.models.layers import KVCache
from jaxrs.parallel.mesh import TP, mesh_size
from jaxrs.parallel.split_tensor import SplitTensor, split_of
from jaxrs.quant.in_pieces import InPieces
from jaxrs.quant.tensor import QuantizedTensor

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
ROW = ("o_proj", "down_proj")  # input columns split
VOCAB = ("embed", "lm_head")  # vocabulary rows split
KV_PROJ = ("k_proj", "v_proj")
KV_SPEC = P(None, None, None, TP, None)  # [layers, blocks, block_size, kv_heads, head_dim]


def split_axis(path: tuple[str, ...]) -> int | None:
    """Which axis of the parameter at `path` is split, counted from the end (-2: output rows, -1: input
    columns or a bias), or None: replicated."""
    module, name = path[-2], path[-1]
    if module in COLUMN or module in VOCAB:
        return -2 if name == "weight" else -1
    if module in ROW and name == "weight":
        return -1
    return None


def kv_heads_on(cfg: ModelConfig, devices: int) -> int:
    """KV heads a `devices`-way split runs with: the model's, or one per device when it has fewer."""
    if cfg.num_heads % devices:
        raise JaxrsError(
            f"tensor_parallel_size {devices} must divide the model's {cfg.num_heads} attention heads"
        )
    kv = cfg.num_kv_heads
    if kv % devices == 0:
        return kv
    if devices % kv == 0:
        return devices
    raise JaxrsError(
        f"tensor_parallel_size {devices} must divide the model's {kv} KV heads or be a multiple of them"
    )


def sharded_config(cfg: ModelConfig, devices: int) -> ModelConfig:
    """The config the model runs with on `devices` shards (KV heads repeated up to one per device)."""
    return dataclasses.replace(cfg, num_kv_heads=kv_heads_on(cfg, devices))


def repeat_kv_rows(leaf: Any, cfg: ModelConfig, heads: int, axis: int) -> Any:
    """A k/v projection's weight (`axis` -2) or bias (-1) with each KV head's rows repeated until there
    are `heads`; unchanged if it already has them (the shards' own weights, read back for re-ISQ).
    Host arrays stay on the host (placing them on the mesh then slices on the host, compiling nothing)."""

    def repeat(a):
        rows = a.shape[axis]
        if rows == heads * cfg.head_dim:
            return a
        xp = np if isinstance(a, np.ndarray) else jnp
        shape = a.shape
        grouped = a.reshape(*shape[:axis], cfg.num_kv_heads, cfg.head_dim, *shape[axis:][1:])
        grouped = xp.repeat(grouped, heads // cfg.num_kv_heads, axis=grouped.ndim + axis - 1)
        return grouped.reshape(*shape[:axis], heads * cfg.head_dim, *shape[axis:][1:])

    if isinstance(leaf, QuantizedTensor):
        out = jax.tree.map(repeat, leaf)
        out.out_in = (heads * cfg.head_dim, leaf.out_in[1])
        return out
    return repeat(leaf)


def leaf_spec(path: tuple[str, ...], leaf: Any, devices: int) -> P:
    """The PartitionSpec of one parameter (a `QuantizedTensor`'s arrays all take the same one); raises
    `JaxrsError` naming the parameter when its split axis does not divide, or cuts a packed block."""
    axis = split_axis(path)
    name = ".".join(path)
    if axis is None or devices == 1:
        return P()
    ndim = leaf.ndim
    size = leaf.shape[axis]
    if size % devices:
        if path[-2] in VOCAB:  # an odd vocabulary: the table stays whole on every device
            return P()
        raise JaxrsError(f"tensor_parallel_size {devices} does not divide {name}'s dimension {size}")
    if isinstance(leaf, QuantizedTensor) and axis == -1:
        block = leaf.spec.block
        if size % (devices * block) or any(a.shape[-1] % devices for a in leaf.arrays.values()):
            raise JaxrsError(
                f"{name} is packed as {leaf.fmt} in blocks of {block}: its {size} inputs do not split "
                f"into {devices} whole-block shards; use a tensor_parallel_size whose shards hold whole "
                f"blocks ({size} / N a multiple of {block}), or load it unpacked (--dequantize)"
            )
    spec = [None] * ndim
    spec[ndim + axis] = TP
    return P(*spec)


def _leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple[str, ...], dict, Any]]:
    """(path, parent, key) of every parameter of a nested dict (per-layer tuples indexed in place)."""
    for key, node in list(tree.items()):
        if isinstance(node, tuple):  # unrolled layers: a tuple of per-layer dicts
            for layer in node:
                yield from _leaves(layer, (*prefix, key))
        elif isinstance(node, dict):
            yield from _leaves(node, (*prefix, key))
        else:
            yield (*prefix, key), tree, key


def shard_params(cfg: ModelConfig, params: dict, mesh: Mesh) -> ModelConfig:
    """Place `params` on `mesh`, in place (each leaf replaced by its sharded copy as it goes, so the
    unsharded one can be freed), and return the config the model runs with there. Packed weights
    become `SplitTensor`s. Every problem is found before anything moves."""
    devices = mesh_size(mesh)
    heads = kv_heads_on(cfg, devices)
    leaves = list(_leaves(params))
    plan = []
    for path, parent, key in leaves:
        leaf = parent[key]
        if isinstance(leaf, InPieces):  # a mesh splits the whole weight its own way
            leaf = leaf.joined()
        if heads != cfg.num_kv_heads and path[-2] in KV_PROJ:
            leaf = repeat_kv_rows(leaf, cfg, heads, -2 if path[-1] == "weight" else -1)
        spec = leaf_spec(path, leaf, devices)
        if isinstance(leaf, QuantizedTensor):
            leaf = SplitTensor(leaf, split_of(spec, leaf.ndim))
        plan.append((parent, key, leaf, spec))
    host = mesh.is_multi_process  # a mesh over several processes takes each one's host copy
    for parent, key, leaf, spec in plan:
        if host:
            leaf = jax.tree.map(np.asarray, leaf)
        parent[key] = jax.device_put(leaf, NamedSharding(mesh, spec))
    return dataclasses.replace(cfg, num_kv_heads=heads)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """Where the paged KV cache lives: split by KV heads across the mesh."""
    return NamedSharding(mesh, KV_SPEC)


def pin_step_outputs(logits: jax.Array, kv: KVCache) -> tuple[jax.Array, KVCache]:
    """Inside a step traced under a mesh (`jax.set_mesh`): the logits replicated (every device samples
    alike) and the cache split by heads (as the next call takes it). Without a mesh: unchanged."""
    if jax.sharding.get_abstract_mesh().empty:
        return logits, kv
    logits = jax.lax.with_sharding_constraint(logits, P())
    return logits, KVCache(*(jax.lax.with_sharding_constraint(a, KV_SPEC) for a in kv))


def tree_shardings(tree: Any) -> list[Any]:
    """Each leaf's sharding, for tests and logs."""
    return [getattr(a, "sharding", None) for a in jax.tree.leaves(tree)]


def per_device_bytes(tree: Any) -> int:
    """Bytes the largest shard set of `tree` holds on one device."""
    per: dict[Any, int] = {}
    for a in jax.tree.leaves(tree):
        for shard in getattr(a, "addressable_shards", ()):
            per[shard.device] = per.get(shard.device, 0) + int(np.prod(shard.data.shape)) * a.dtype.itemsize
    return max(per.values(), default=0)
