"""The parameter-holding building blocks as `flax.nnx` modules: linear (dense or packed), embedding, norms,
stacked expert matrices. Their math is the pure functions of `layers.py`; the modules only hold the
weights and say which function applies. Modules are built abstractly (`nnx.eval_shape`) and filled from
a checkpoint, so constructors only declare shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrs.config import ModelConfig
from jaxrs.lora.experts import expert_term
from jaxrs.lora.weight import LoraWeight
from jaxrs.models.head_slices import head_in_slices
from jaxrs.models.layers import Weight, dense, embed, layer_norm, rms_norm
from jaxrs.ops import Kernels
from jaxrs.parallel.sharded_kernels import split_matmul
from jaxrs.quant import QuantizedTensor, dequantize


def _param(*shape: int) -> nnx.Param:
    """A parameter slot of this shape; its value comes from the checkpoint (`loading.checkpoint`)."""
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def value(param: nnx.Param) -> Weight:
    """A parameter's array, or its `QuantizedTensor` when it is stored packed."""
    return param.get_value()


def optional_value(param: nnx.Param | None) -> Weight | None:
    return None if param is None else value(param)


class Linear(nnx.Module):
    """`x @ weight.T (+ bias)`, the weight in the checkpoint layout `[out, in]`: a dense array, or a
    packed `QuantizedTensor` that the `qmatmul` op reads without unpacking it in memory first."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False):
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None

    def __call__(self, x: jax.Array, kernels: Kernels) -> jax.Array:
        return dense(x, value(self.weight), optional_value(self.bias), kernels)


class Embedding(nnx.Module):
    """Token embeddings `[vocab, hidden]`; also the output head of a model with tied embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.weight = _param(vocab_size, hidden_size)

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return embed(value(self.weight), tokens, dtype)


def head_logits(head: Weight, hidden: jax.Array, kernels: Kernels) -> jax.Array:
    """`hidden @ head.T` in f32: a dense head accumulates in f32 directly (the `matmul` op), a packed one
    through qmatmul (on a mesh, each device its vocabulary slice, sliced further there on CPU)."""
    if isinstance(head, QuantizedTensor):
        in_slices = functools.partial(head_in_slices, kernels.get("qmatmul"))
        return split_matmul(in_slices, in_slices)(hidden, head)
    return kernels.get("matmul")(hidden, head, jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm in f32, scaling by `offset + weight` (Gemma stores weight - 1 and has offset 1)."""

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0):
        self.weight = _param(dim)
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array, kernels: Kernels = Kernels()) -> jax.Array:
        return rms_norm(x, value(self.weight), self.eps, offset=self.offset, row_sum=kernels.get("row_sum"))


class LayerNorm(nnx.Module):
    """LayerNorm in f32 with its bias (Phi, Starcoder2)."""

    def __init__(self, dim: int, *, eps: float):
        self.weight = _param(dim)
        self.bias = _param(dim)
        self.eps = eps

    def __call__(self, x: jax.Array, kernels: Kernels = Kernels()) -> jax.Array:
        return layer_norm(x, value(self.weight), value(self.bias), self.eps, row_sum=kernels.get("row_sum"))


Norm = RMSNorm | LayerNorm


def make_norm(cfg: ModelConfig, dim: int) -> Norm:
    """The model's norm over `dim` features: LayerNorm or RMSNorm, as the config says."""
    if cfg.layer_norm:
        return LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, eps=cfg.rms_norm_eps, offset=cfg.norm_offset)


class Experts(nnx.Module):
    """One matrix per expert, stacked `[experts, out, in]` (dense or packed), for grouped matmuls."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        self.weight = _param(num_experts, out_features, in_features)

    def dense(self, dtype: jnp.dtype) -> jax.Array:
        """The stacked matrices in `dtype`; packed experts are dequantized (one layer's worth)."""
        w = value(self.weight)
        w = w.base if isinstance(w, LoraWeight) else w
        return dequantize(w, dtype) if isinstance(w, QuantizedTensor) else w.astype(dtype)

    def lora(self, x: jax.Array, experts: jax.Array, rows: jax.Array) -> jax.Array | float:
        """The LoRA adapters' term for token copies `x` of batch `rows` routed to `experts` (0 without
        adapters); see `jaxrs.lora.experts`."""
        w = value(self.weight)
        term = expert_term(w, x, experts, rows) if isinstance(w, LoraWeight) else None
        return 0.0 if term is None else term
