"""The kernel switchboard: each op has named implementations, chosen per call site by name.

Models call `ops.resolve(op, name)` at trace time, so swapping a kernel never touches a model file.
A researcher plugs in a new implementation with::

    from jaxrs import ops

    @ops.register("paged_attention", "mine")
    def my_attention(q, k_cache, v_cache, layer, block_tables, positions, context_lens, *, scale,
                     sliding_window=None, soft_cap=None): ...

    LLM(model, kernels={"paged_attention": "mine"})

An implementation must have the signature of the XLA reference in `pallas_kernels/` for its op, except
`qmatmul`, whose implementations take the packed weight whole: `fn(x, qt: QuantizedTensor) -> y`
(`pallas_kernels` knows nothing of jaxrs, so its qmatmul kernels take the tensor's arrays, format and
shape; `qmatmul_xla` and `qmatmul_pallas` here adapt them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxrs.errors import JaxrsError
from jaxrs.parallel.sharded_kernels import for_mesh
from jaxrs.quant.in_pieces import InPieces
from jaxrs.quant.stacked_layer import StackedLayer
from jaxrs.quant.tensor import QuantizedTensor
from pallas_kernels import batch_invariant, qmatmul
from pallas_kernels.lora import lora_pallas, lora_xla
from pallas_kernels.paged_attention import paged_attention_pallas, paged_attention_xla, write_kv_xla

_IMPLS: dict[str, dict[str, Callable]] = {}
# Implementation used when nothing is chosen, by platform ("cpu", "gpu", "tpu"); "*" for any.
_DEFAULTS: dict[str, dict[str, str]] = {}


def register(op: str, name: str, *, default_on: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding `fn` as implementation `name` of `op` (replacing one of the same name)."""

    def add(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[name] = fn
        for platform in default_on:
            _DEFAULTS.setdefault(op, {})[platform] = name
        return fn

    return add


def implementations(op: str) -> list[str]:
    return sorted(_IMPLS.get(op, {}))


def default_name(op: str, platform: str | None = None) -> str:
    platform = platform or jax.default_backend()
    defaults = _DEFAULTS.get(op, {})
    return defaults.get(platform) or defaults["*"]


def resolve(op: str, name: str | None = None) -> Callable:
    """The implementation `name` of `op`, or the platform default."""
    if op not in _IMPLS:
        raise JaxrsError(f"unknown op {op!r} (known: {', '.join(sorted(_IMPLS))})")
    name = name or default_name(op)
    try:
        return _IMPLS[op][name]
    except KeyError:
        raise JaxrsError(
            f"no implementation {name!r} of {op!r} (registered: {', '.join(implementations(op))})"
        ) from None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A hashable choice of implementation per op; passed to jitted functions as a static argument."""

    choice: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str] | None) -> Kernels:
        mapping = dict(mapping or {})
        for op, name in mapping.items():
            resolve(op, name)  # fail early on a typo
        return cls(tuple(sorted(mapping.items())))

    def get(self, op: str) -> Callable:
        """The chosen implementation, as a step traced on a tensor-parallel mesh runs it (per shard;
        see `jaxrs.parallel.sharded_kernels`)."""
        return for_mesh(op, resolve(op, dict(self.choice).get(op)), lambda: resolve(op, "xla"))


def _taking_quantized_tensor(
    kernel: Callable, *, reads_stacks: bool = False, reads_pieces: bool = False
) -> Callable:
    """`kernel(x, arrays, *, fmt, out_in, **options)` as the op's `fn(x, qt, **options)`. A kernel that
    `reads_stacks` gets a `StackedLayer`'s whole stack and its `layer` index instead of the slice; one
    that `reads_pieces` multiplies an `InPieces` weight piece by piece (`_product_in_pieces`); any other
    gets the pieces joined (its own reduction order over `in`: the batch-invariant kernel's)."""

    def op(x: jax.Array, qt: QuantizedTensor, **options) -> jax.Array:
        if isinstance(qt, InPieces):
            if reads_pieces:
                return _product_in_pieces(op, x, qt, **options)
            qt = qt.joined()  # a kernel that takes the weight whole
        if reads_stacks and isinstance(qt, StackedLayer):
            return kernel(x, qt.stack.arrays, fmt=qt.fmt, out_in=qt.out_in, layer=qt.layer, **options)
        return kernel(x, qt.arrays, fmt=qt.fmt, out_in=qt.out_in, **options)

    op.__name__ = op.__qualname__ = kernel.__name__
    op.__doc__ = f"`{kernel.__module__}.{kernel.__name__}` on a `QuantizedTensor`."
    return op


def _product_in_pieces(op: Callable, x: jax.Array, qt: InPieces, **options) -> jax.Array:
    """`x @ W.T` for W held in pieces along `in`: the pieces' products summed as `qmatmul._product_t` sums
    a whole weight's pieces in a one-row product (`qmatmul.sum_of_parts`: the same values there; a GEMM's
    two partial sums round apart). Joining the pieces for a GEMM instead (XLA fuses the join into the
    dequantization) made a 32-row step 0.92x (bench/RESULTS.md, "Long rows stored in pieces")."""
    parts = [op(x[..., a:b], piece, **options) for (a, b), piece in zip(qt.spans, qt.pieces, strict=True)]
    return qmatmul.sum_of_parts(parts).astype(parts[0].dtype)


qmatmul_xla = _taking_quantized_tensor(qmatmul.qmatmul_xla, reads_stacks=True, reads_pieces=True)
qmatmul_pallas = _taking_quantized_tensor(qmatmul.qmatmul_pallas)
qmatmul_invariant = _taking_quantized_tensor(batch_invariant.qmatmul_invariant)

register("paged_attention", "xla", default_on=("*",))(paged_attention_xla)
register("paged_attention", "pallas", default_on=("gpu",))(paged_attention_pallas)
register("paged_attention", "invariant")(batch_invariant.paged_attention_invariant)
register("write_kv", "xla", default_on=("*",))(write_kv_xla)
register("qmatmul", "xla", default_on=("*",))(qmatmul_xla)
register("qmatmul", "pallas", default_on=("gpu",))(qmatmul_pallas)
register("qmatmul", "invariant")(qmatmul_invariant)  # the batch-invariant mode's (`batch_invariance`)
# A float weight's product, `fn(x, w [out, in], out_dtype=None)`: `qmatmul.matmul_t`'s signature.
register("matmul", "xla", default_on=("*",))(qmatmul.matmul_t)
# The same products with GEMMs of 4 rows or more in bfloat16 operands (`jaxrs.engine.matmul_dtype`).
register("qmatmul", "xla_bf16")(functools.partial(qmatmul_xla, gemm_dtype=jnp.bfloat16))
register("matmul", "xla_bf16")(functools.partial(qmatmul.matmul_t, gemm_dtype=jnp.bfloat16))
register("matmul", "invariant")(batch_invariant.matmul_invariant)


def gemm_dtype(qmatmul_op: Callable) -> jnp.dtype | None:
    """The GEMM operand dtype a `qmatmul` (or `matmul`) implementation was registered with (`xla_bf16`:
    bfloat16), None for one without."""
    return getattr(qmatmul_op, "keywords", {}).get("gemm_dtype")


def chosen_gemm_dtype(kernels: Kernels) -> jnp.dtype | None:
    """`gemm_dtype` of the `qmatmul` implementation `kernels` choose (as registered: not as a mesh wraps
    it)."""
    return gemm_dtype(resolve("qmatmul", dict(kernels.choice).get("qmatmul")))


def takes_row_tiles(qmatmul_op: Callable, rows: int, fmt: str, out_in: tuple[int, int] | None = None) -> bool:
    """Whether the `qmatmul` implementation `qmatmul_op` reads a `fmt` (`out_in`) weight a row or a tile
    at a time in a product of `rows` rows (`qmatmul.few_row_path`: the XLA kernel on CPU, unless its GEMM
    dtype takes that many rows whole), so that a caller need not cut the weight itself (the head's
    slices)."""
    kernel = getattr(qmatmul_op, "func", qmatmul_op)
    return kernel is qmatmul_xla and qmatmul.few_row_path(rows, fmt, gemm_dtype(qmatmul_op), out_in)


def attention_cost_follows_context(kernels: Kernels, table_keys: int, *, decode: bool) -> bool:
    """Whether the `paged_attention` implementation `kernels` choose costs, over a block table of
    `table_keys` keys, what its rows' contexts need rather than the table's width: its own
    `cost_follows_context` rule where it has one (the XLA and batch-invariant forms). Others (the Pallas
    kernel, whose KV splits follow the width; a user's) are sent tables bucketed to the context."""
    attention = resolve("paged_attention", dict(kernels.choice).get("paged_attention"))
    rule = getattr(attention, "cost_follows_context", None)
    return rule is not None and rule(table_keys, decode=decode)


# A sum over the last axis (the norms' means), `fn(x) -> x.sum(-1)`.
register("row_sum", "xla", default_on=("*",))(functools.partial(jnp.sum, axis=-1))
register("row_sum", "invariant")(batch_invariant.tree_sum)
register("lora", "xla", default_on=("*",))(lora_xla)
register("lora", "pallas")(lora_pallas)
