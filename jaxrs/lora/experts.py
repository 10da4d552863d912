"""LoRA on a sparse MoE's experts (Mixtral's w1/w3/w2, transformers 5's fused `gate_up_proj` and
`down_proj`): each expert of each adapter has its own A and B, stacked `a: [slots, experts, rank, in]`,
`b: [slots, experts, out, rank]` in the experts' `LoraWeight`.

The MoE runs its token copies sorted by expert through grouped matmuls; the adapters' term runs the
same way over (slot, expert) groups: each copy's group is its row's slot times the expert count plus
its expert, copies of rows without an adapter go to one all-zero group at the end, and a shrink and an
expand grouped matmul (`ragged_dot`) give every copy `B[s, e] @ A[s, e] @ x` with no per-copy weight
gather. The XLA path serves every kernel choice (the `lora` op's Pallas kernels are for dense layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrs.errors import JaxrsError
from jaxrs.lora.weight import LoraWeight


def ragged_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, out_dtype=None) -> jax.Array:
    """Grouped matmul: rows of `x` `[M, in]` sorted by group, group g times `w[g]` (`[G, out, in]`)."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    return jax.lax.ragged_dot_general(x, w, group_sizes, dims, preferred_element_type=out_dtype)


def expert_term(weight: LoraWeight, x: jax.Array, experts: jax.Array, rows: jax.Array) -> jax.Array | None:
    """The adapters' term for token copies `x` `[M, in]` routed to `experts` `[M]` from batch `rows`
    `[M]` (`[M, out]` in x's dtype, accumulated in f32), or None when no slots are bound."""
    if weight.mix is not None:
        raise JaxrsError("X-LoRA does not adapt a MoE's experts")
    if weight.slots is None:
        return None
    num_slots, num_experts, rank, in_features = weight.a.shape
    out_features = weight.b.shape[-2]
    groups = num_slots * num_experts
    slot = weight.slots[rows]
    group = jnp.where(slot < 0, groups, slot * num_experts + experts)
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=groups + 1).astype(jnp.int32)
    a = jnp.concatenate([weight.a.reshape(groups, rank, in_features), jnp.zeros((1, rank, in_features))])
    b = jnp.concatenate([weight.b.reshape(groups, out_features, rank), jnp.zeros((1, out_features, rank))])
    h = ragged_matmul(x[order], a.astype(x.dtype), sizes, jnp.float32)
    y = ragged_matmul(h, b.astype(jnp.float32), sizes, jnp.float32)
    return jnp.zeros((x.shape[0], out_features), x.dtype).at[order].set(y.astype(x.dtype))
