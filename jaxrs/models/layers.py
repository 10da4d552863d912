"""Building blocks shared by the model families: pure functions over arrays."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig, RopeScaling
from jaxrs.lora.weight import LoraWeight
from jaxrs.ops import Kernels
from jaxrs.quant import QuantizedTensor, dequantize

Weight = jax.Array | QuantizedTensor
RowSum = Callable[[jax.Array], jax.Array]  # the sum over the last axis (the `row_sum` op)


def _row_mean(x: jax.Array, row_sum: RowSum | None) -> jax.Array:
    """The mean over the last axis, kept as an axis of 1."""
    if row_sum is None:
        return jnp.mean(x, axis=-1, keepdims=True)
    return (row_sum(x) / x.shape[-1])[..., None]


class KVCache(NamedTuple):
    """Paged K/V for every layer: `[layers, num_blocks, block_size, kv_heads, head_dim]` each."""

    k: jax.Array
    v: jax.Array


class AttentionMetadata(NamedTuple):
    """Where a padded batch `[B, T]` of tokens sits in the paged cache.

    positions: absolute position of each token; slot_mapping: the slot its K/V goes to (-1 = padding);
    block_tables: `[B, NB]` physical blocks per sequence; context_lens: valid keys per sequence after
    this step's tokens are written; rope_lens: the sequence length LongRoPE picks its factor set by
    (a chunked prefill passes the length of the whole prefill, as if it ran at once; default
    context_lens).
    """

    positions: jax.Array
    slot_mapping: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    rope_lens: jax.Array | None = None


def rms_norm(
    x: jax.Array, weight: jax.Array, eps: float, *, offset: float = 0.0, row_sum: RowSum | None = None
) -> jax.Array:
    """RMSNorm computed in f32 (weight applied as `offset + weight`: Gemma stores w - 1); `row_sum`: the
    sum over the last axis (the `row_sum` op; default `jnp.sum`)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(_row_mean(xf * xf, row_sum) + eps)
    return (xf * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def layer_norm(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float, *, row_sum: RowSum | None = None
) -> jax.Array:
    """LayerNorm computed in f32 (Phi, Starcoder2): mean-centred, scaled, plus the bias if there is one."""
    xf = x.astype(jnp.float32)
    xf = xf - _row_mean(xf, row_sum)
    xf = xf * jax.lax.rsqrt(_row_mean(xf * xf, row_sum) + eps)
    xf = xf * weight.astype(jnp.float32)
    return (xf if bias is None else xf + bias.astype(jnp.float32)).astype(x.dtype)


def dense(
    x: jax.Array, weight: Weight, bias: jax.Array | None = None, kernels: Kernels = Kernels()
) -> jax.Array:
    """`x @ weight.T (+ bias)` with weight in the checkpoint layout `[out, in]`; packed weights go
    through the `qmatmul` op, which reads them without unpacking them in memory first, float ones
    through the `matmul` op; a `LoraWeight` adds its adapters' term (the `lora` op) to its base's."""
    if isinstance(weight, LoraWeight):
        y, term = dense(x, weight.base, bias, kernels), weight.term(x, kernels)
        return y if term is None else y + term.astype(y.dtype)
    if isinstance(weight, QuantizedTensor):
        y = kernels.get("qmatmul")(x, weight)
    else:
        y = kernels.get("matmul")(x, weight)
    return y if bias is None else y + bias.astype(y.dtype)


def embed(table: Weight, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of the embedding table; a packed table gathers and dequantizes only the rows it needs."""
    if isinstance(table, QuantizedTensor):
        rows = QuantizedTensor(
            table.fmt,
            (tokens.size, table.out_in[1]),
            {name: a[tokens.reshape(-1)] for name, a in table.arrays.items()},
        )
        return dequantize(rows, dtype).reshape(*tokens.shape, table.out_in[1])
    return table[tokens].astype(dtype)


# A gated MLP's hidden row `act(gate) * up` (silu, tanh-gelu) is computed as `gate * up / (1 + exp(-s))`,
# ending in a division rather than in multiplications: XLA:CPU fuses a producer of cheap ops into the
# one-row GEMV that reads it (down_proj, in a decode step) and recomputes it for every tile of output
# rows, while a division, to it expensive, is computed once. One-row decode steps took 0.88-0.94x the time
# on the demo, 0.93-0.95x on Gemma-3-270M, 0.87-0.90x on Qwen2.5-0.5B (bench/RESULTS.md, "Down_proj's
# input computed once"). Read when tracing, so a benchmark may set it between compiles.
GATE_ENDS_IN_DIVISION = True


def gated_activation(gate: jax.Array, up: jax.Array, kind: str) -> jax.Array:
    """`activation(gate, kind) * up`; in float32 (the CPU's compute dtype, where XLA:CPU's fusion makes it
    pay), for silu and tanh-gelu (`x * sigmoid(s)` both), as a division (`GATE_ENDS_IN_DIVISION`): the same
    value to rounding."""
    if not GATE_ENDS_IN_DIVISION or kind not in ("silu", "gelu_tanh") or gate.dtype != jnp.float32:
        return activation(gate, kind) * up
    s = gate if kind == "silu" else 2 * math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
    return (gate * up) / (1 + jnp.exp(-s))


def activation(x: jax.Array, kind: str) -> jax.Array:
    """The MLP gate activation: silu, gelu_tanh (GeGLU as Gemma runs it) or gelu (exact)."""
    if kind == "silu":
        return jax.nn.silu(x)
    if kind in ("gelu_tanh", "gelu"):
        return jax.nn.gelu(x, approximate=kind == "gelu_tanh")
    raise ValueError(f"unknown activation {kind!r}")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling, rotary_dim: int | None = None
) -> np.ndarray:
    """Inverse frequencies `[rotary_dim // 2]` (a host constant, folded into the compiled step)."""
    dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling.kind == "longrope":  # the short set; `longrope_inv_freq` gives either
        inv_freq = longrope_inv_freq(dim, theta, scaling.short_factor)
    elif scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "freq_factors":
        inv_freq = inv_freq / np.asarray(scaling.freq_factors, dtype=np.float64)
    elif scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif scaling.kind == "yarn":
        inv_freq = yarn_inv_freq(inv_freq, dim, theta, scaling)
    return inv_freq.astype(np.float32)


def yarn_inv_freq(inv_freq: np.ndarray, dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """YaRN: dims that turn fewer than `beta_slow` times over the original context are interpolated
    (divided by `factor`), those turning more than `beta_fast` times keep their frequency, a linear ramp
    between (transformers' `_compute_yarn_parameters`)."""

    def dim_at(rotations: float) -> float:
        return (
            dim
            * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = dim_at(scaling.beta_fast), dim_at(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the unchanged frequency
    return inv_freq / scaling.factor * (1 - keep) + inv_freq * keep


def dynamic_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, lengths: jax.Array) -> jax.Array:
    """Dynamic NTK's inverse frequencies `[B, rotary_dim // 2]`, per sequence: the base grows with the
    sequence's length once it passes `original_max_position_embeddings` (transformers'
    `_compute_dynamic_ntk_parameters`, there with the longest sequence of the batch)."""
    original = scaling.original_max_position_embeddings
    length = jnp.maximum(jnp.asarray(lengths), original).astype(jnp.float32)
    growth = (scaling.factor * length / original) - (scaling.factor - 1)
    base = jnp.float32(theta) * growth ** (rotary_dim / (rotary_dim - 2))
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (base[:, None] ** exponents)


def longrope_inv_freq(rotary_dim: int, theta: float, factors: tuple[float, ...]) -> np.ndarray:
    """LongRoPE's inverse frequencies: each of the `rotary_dim // 2` base frequencies divided by its
    factor (computed in f32, as transformers does)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    ext = np.asarray(factors, dtype=np.float32)
    if ext.shape != exponents.shape:
        raise ValueError(f"longrope needs {exponents.size} factors, got {ext.size}")
    return (np.float32(1.0) / (ext * np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, rotary_dim]` in f32 (halves repeated, the HF rotate-half layout);
    `inv_freq`: `[rotary_dim // 2]`, or `[B, rotary_dim // 2]` per sequence."""
    inv_freq = jnp.asarray(inv_freq)
    per_token = inv_freq if inv_freq.ndim == 1 else inv_freq[:, None]
    angles = positions.astype(jnp.float32)[..., None] * per_token
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[B, T, H, D]` by position (rotate-half convention); only the first cos.shape[-1] dims."""
    rot = cos.shape[-1]
    xr, xpass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
    return out if xpass.shape[-1] == 0 else jnp.concatenate([out, xpass], axis=-1)


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: jnp.dtype, sharding=None
) -> KVCache:
    """The zeroed pool, placed by `sharding` if given (split by heads over a tensor-parallel mesh)."""
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding))
