"""The kernel switchboard: each op has named implementations, chosen per call site by name.

Models call `ops.resolve(op, name)` at trace time, so swapping a kernel never touches a model file.
A researcher plugs in a new implementation with::

    from jaxrs import ops

    @ops.register("paged_attention", "mine")
    def my_attention(q, k_cache, v_cache, layer, block_tables, positions, context_lens, *, scale,
                     sliding_window=None, soft_cap=None): ...

    LLM(model, kernels={"paged_attention": "mine"})

An implementation must have the signature of the XLA reference in `pallas_kernels/` for its op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax

from jaxrs.errors import JaxrsError
from pallas_kernels.paged_attention import paged_attention_pallas, paged_attention_xla, write_kv_xla
from pallas_kernels.qmatmul import qmatmul_pallas, qmatmul_xla

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
        return resolve(op, dict(self.choice).get(op))


register("paged_attention", "xla", default_on=("*",))(paged_attention_xla)
register("paged_attention", "pallas", default_on=("gpu",))(paged_attention_pallas)
register("write_kv", "xla", default_on=("*",))(write_kv_xla)
register("qmatmul", "xla", default_on=("*",))(qmatmul_xla)
register("qmatmul", "pallas", default_on=("gpu",))(qmatmul_pallas)
