"""A linear layer's weight with low-rank adapters beside it: `x @ base.T + B[s] @ A[s] @ x` for the slot
`s` of each batch row.

A `LoraWeight` takes the place of a projection's weight in the parameter tree, so the model code is the
same with and without adapters: `layers.dense` sees the type and adds the `lora` op's term. The base
stays as it was loaded (dense or packed: QLoRA-style, the adapters run beside the quantized matmul).
The per-row slots are bound inside the jitted step (`bind_slots`) from a step argument; without them
(`slots` None: a scoring call, a step without adapters) the layer is the base alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.lora import lora_weighted_xla


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """base: `[out, in]` array or `QuantizedTensor`; a: `[slots, rank, in]`; b: `[slots, out, rank]` with
    each adapter's scaling folded in; slots: `[rows]` (-1: no adapter). Stacked layers add a leading
    layer axis to every field. A MoE's expert stack has an expert axis after the slot axis
    (`a: [slots, experts, rank, in]`, see `jaxrs.lora.experts`)."""

    base: Any
    a: jax.Array
    b: jax.Array
    slots: jax.Array | None = None
    mix: jax.Array | None = None  # X-LoRA: per-token weights of every slot, `[rows, tokens, slots]`

    def term(self, x: jax.Array, kernels: Any) -> jax.Array | None:
        """The adapters' contribution for `x` `[rows, ..., in]`, or None when nothing is bound."""
        if self.mix is not None:
            return lora_weighted_xla(x, self.a, self.b, self.mix)
        if self.slots is None:
            return None
        return kernels.get("lora")(x, self.a, self.b, self.slots)


def is_lora(node: object) -> bool:
    return isinstance(node, LoraWeight)


def _bind(tree: Any, slots: jax.Array) -> Any:
    return jax.tree.map(
        lambda w: dataclasses.replace(w, slots=slots) if is_lora(w) else w, tree, is_leaf=is_lora
    )


def bind_slots(params: dict, slots: jax.Array) -> dict:
    """`params` with every `LoraWeight` reading `slots` (`[rows]`): broadcast over the layer axis for
    stacked layers, as is for unrolled ones."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return {**params, "layers": tuple(_bind(layer, slots) for layer in layers)}
    loras = [w for w in jax.tree.leaves(layers, is_leaf=is_lora) if is_lora(w)]
    if not loras:
        return params
    stacked = jnp.broadcast_to(slots, (loras[0].a.shape[0], *slots.shape))
    return {**params, "layers": _bind(layers, stacked)}


def bind_mix(params: dict, mix: dict[tuple[str, str], jax.Array]) -> dict:
    """`params` with the `LoraWeight` of each (group, projection) in `mix` reading its per-token slot
    weights `[layers, rows, tokens, slots]` (stacked layers only)."""
    layers = dict(params["layers"])
    for (group, proj), weights in mix.items():
        node = dict(layers[group][proj])
        node["weight"] = dataclasses.replace(node["weight"], mix=weights)
        layers[group] = {**layers[group], proj: node}
    return {**params, "layers": layers}


def without_adapters(params: dict) -> dict:
    """`params` with every `LoraWeight` replaced by its base weight: the model without adapters, at no
    adapter cost (X-LoRA's scaling pass)."""
    return jax.tree.map(lambda w: w.base if is_lora(w) else w, params, is_leaf=is_lora)
