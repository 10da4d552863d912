"""Low-rank adapters gathered per row: `y = B[s] @ (A[s] @ x)` where `s` is the slot of the adapter each
batch row uses (-1: none, the term is zero).

The adapters served at once sit in fixed slots of two stacks, `a: [slots, rank, in]` and
`b: [slots, out, rank]` (the adapter's scaling already folded into `b`), padded with zeros to one rank,
so loading or unloading an adapter changes the arrays' values, never their shapes, and no step
recompiles. Rows with different adapters (and rows with none) run in one call.

Two implementations with one signature:

- `lora_xla` (reference): every row is shrunk by every slot's A (`[rows, slots * rank]`, small: the
  rank is small), the slots a row does not use are zeroed, and one matmul expands the result by all the
  B stacked along their rank; no gather of per-row weight copies. It is `lora_weighted_xla` with one-hot
  weights; X-LoRA passes its per-token scalings there.
- `lora_pallas`: vLLM's Punica split into a shrink kernel (`h = A[s] @ x`, one program per token) and an
  expand kernel (`y = B[s] @ h`, one program per token and block of outputs), each reading only its
  token's slot of the stacks (the slot index is loaded inside the kernel; Triton has no scalar prefetch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.shapes import next_power_of_2

# `jax.experimental.pallas.triton` (GPU compiler parameters, masked loads) is imported by the functions
# that use it: its MLIR dialects cost every process about 5 MiB of resident memory, GPU or not.


def _token_slots(x: jax.Array, slots: jax.Array) -> jax.Array:
    """The slot of every token of `x` `[rows, ..., in]`, flattened: the row's slot repeated."""
    per_row = x.size // (x.shape[0] * x.shape[-1])
    return jnp.repeat(slots.astype(jnp.int32), per_row)


def lora_weighted_xla(x: jax.Array, a: jax.Array, b: jax.Array, weights: jax.Array) -> jax.Array:
    """Every slot's term weighted per token: `y = sum_s weights[..., s] * B[s] @ A[s] @ x` (X-LoRA's
    per-token scalings; a one-hot row is plain LoRA). weights: `[rows, ..., S]` like x without `in`."""
    num_slots, rank, _ = a.shape
    x2 = x.reshape(-1, x.shape[-1])
    h = jnp.einsum("ti,sri->tsr", x2, a.astype(x.dtype), preferred_element_type=jnp.float32)
    h = h * weights.reshape(-1, num_slots, 1).astype(jnp.float32)
    h = h.reshape(x2.shape[0], num_slots * rank)
    b_flat = jnp.transpose(b, (1, 0, 2)).reshape(b.shape[1], num_slots * rank)  # [out, S * R]
    y = jnp.einsum("tk,ok->to", h, b_flat.astype(jnp.float32), preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], b.shape[1])


def lora_xla(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array) -> jax.Array:
    """Reference. x: `[rows, ..., in]`; a: `[S, R, in]`; b: `[S, out, R]`; slots: `[rows]` (-1: none).
    Returns `[rows, ..., out]` in x's dtype, accumulated in f32."""
    used = _token_slots(x, slots)[:, None] == jnp.arange(a.shape[0])[None, :]  # [T, S]; none: all False
    return lora_weighted_xla(x, a, b, used.reshape(*x.shape[:-1], a.shape[0]))


def _shrink_kernel(slots_ref, x_ref, a_ref, h_ref, *, in_features: int, rank: int, block_k: int):
    """h[t] = A[slot(t)] @ x[t] over `in` in steps of `block_k` (masked at the edge)."""
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    t = pl.program_id(0)
    slot = slots_ref[t]
    safe = jnp.maximum(slot, 0)

    def step(k, acc):
        cols = k * block_k + jnp.arange(block_k)
        inside = cols < in_features
        xk = plgpu.load(x_ref.at[pl.ds(t, 1), pl.ds(k * block_k, block_k)], mask=inside[None, :], other=0)
        ak = plgpu.load(a_ref.at[safe, :, pl.ds(k * block_k, block_k)], mask=inside[None, :], other=0)
        return acc + jnp.sum(ak.astype(jnp.float32) * xk.astype(jnp.float32), axis=1)

    acc = lax.fori_loop(0, pl.cdiv(in_features, block_k), step, jnp.zeros((rank,), jnp.float32))
    h_ref[pl.ds(t, 1), :] = jnp.where(slot >= 0, acc, 0.0)[None, :]


def _expand_kernel(slots_ref, h_ref, b_ref, y_ref, *, out_features: int, block_o: int):
    """y[t, block j] = B[slot(t)][block j] @ h[t] (masked at the edge of `out`)."""
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    t, j = pl.program_id(0), pl.program_id(1)
    slot = slots_ref[t]
    rows = j * block_o + jnp.arange(block_o)
    inside = rows < out_features
    bj = plgpu.load(
        b_ref.at[jnp.maximum(slot, 0), pl.ds(j * block_o, block_o), :], mask=inside[:, None], other=0
    )
    h = h_ref[pl.ds(t, 1), :]  # [1, R] f32
    y = jnp.where(slot >= 0, jnp.sum(bj.astype(jnp.float32) * h, axis=1), 0.0)
    plgpu.store(
        y_ref.at[pl.ds(t, 1), pl.ds(j * block_o, block_o)],
        y[None, :].astype(y_ref.dtype),
        mask=inside[None, :],
    )


def lora_pallas(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    slots: jax.Array,
    *,
    interpret: bool | None = None,
    block_k: int = 256,
    block_o: int = 128,
    num_warps: int = 4,
) -> jax.Array:
    """Pallas shrink then expand, with the semantics of `lora_xla`. The stacks are read in place (masked
    loads at the edges of `in` and `out`); a rank that is not a power of two is padded with zeros (the
    engine allocates power-of-two ranks, so it never is there). `interpret=None` interprets on CPU."""
    from jax.experimental.pallas import triton as plgpu  # where used: see the imports

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    num_slots, rank, in_features = a.shape
    out_features = b.shape[1]
    padded_rank = next_power_of_2(rank)
    if padded_rank != rank:
        a = jnp.pad(a, ((0, 0), (0, padded_rank - rank), (0, 0)))
        b = jnp.pad(b, ((0, 0), (0, 0), (0, padded_rank - rank)))
    x2 = x.reshape(-1, in_features)
    tokens = x2.shape[0]
    token_slots = _token_slots(x, slots)
    block_k = min(next_power_of_2(block_k), next_power_of_2(in_features))
    block_o = min(next_power_of_2(block_o), next_power_of_2(out_features))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    h = pl.pallas_call(
        functools.partial(_shrink_kernel, in_features=in_features, rank=padded_rank, block_k=block_k),
        grid=(tokens,),
        out_shape=jax.ShapeDtypeStruct((tokens, padded_rank), jnp.float32),
        interpret=interpret,
        compiler_params=params,
        name=f"lora_shrink_r{padded_rank}_k{block_k}",
    )(token_slots, x2, a)
    y = pl.pallas_call(
        functools.partial(_expand_kernel, out_features=out_features, block_o=block_o),
        grid=(tokens, pl.cdiv(out_features, block_o)),
        out_shape=jax.ShapeDtypeStruct((tokens, out_features), x.dtype),
        interpret=interpret,
        compiler_params=params,
        name=f"lora_expand_r{padded_rank}_o{block_o}",
    )(token_slots, h, b)
    return y.reshape(*x.shape[:-1], out_features)
