"""Checkpoint tensors -> an image component's state, by parameter path.

Each component says which checkpoint tensor fills each of its parameters (`names(path)`); a parameter of
stacked layers (run under `lax.scan`) names its tensor with an `{i}`, one tensor per layer, stacked on a
leading axis. ISQ packs the matrices of `Linear` layers as they are read, so they go through the same
quantized matmul (`qmatmul`) as the language models'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.errors import JaxrsError
from jaxrs.loading.checkpoint import stack
from jaxrs.quant import IsqChoice, QuantizedTensor, isq_choice, quantize

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def abstract_state(make: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, dict]:
    """A module's graph definition and its parameter tree of shapes (nothing allocated)."""
    graph, state = nnx.split(nnx.eval_shape(make))
    return graph, state.to_pure_dict()


def fill(
    abstract: dict,
    names: Callable[[str], str],
    get: Getter,
    dtype: jnp.dtype,
    *,
    isq: str | None = None,
    isq_paths: Callable[[str], bool] = lambda path: False,
    tally: Counter[IsqChoice] | None = None,
) -> dict:
    """The state tree `abstract` describes, filled from `get`. `names(path)` is the checkpoint name of
    the parameter at dotted `path` (`{i}` for the layer index of stacked parameters). Parameters for
    which `isq_paths(path)` holds are packed in the ISQ format `isq` (see `jaxrs.quant.isq_choice`);
    the others are cast to `dtype`. A tensor of the wrong shape is an error naming both."""

    def read(path: str, want: tuple[int, ...]) -> jax.Array | QuantizedTensor:
        name = names(path)
        if "{i}" in name:
            tensors = [
                checked(get(name.format(i=i)), want[1:], path, name.format(i=i)) for i in range(want[0])
            ]
        else:
            tensors = [checked(get(name), want, path, name)]
        if isq and isq_paths(path):
            choice = isq_choice("matrix.weight", want, isq)
            if tally is not None:
                tally[choice] += len(tensors)
            if choice.fmt is not None:
                tensors = [quantize(np.asarray(t, np.float32), choice.fmt) for t in tensors]
                packed = stack(tensors, path) if "{i}" in name else tensors[0]
                return jax.device_put(packed)
        value = np.stack(tensors) if "{i}" in name else tensors[0]
        return jnp.asarray(value, dtype=dtype)

    def walk(tree: dict, prefix: str) -> dict:
        out = {}
        for key, leaf in tree.items():
            path = f"{prefix}{key}"
            out[key] = walk(leaf, path + ".") if isinstance(leaf, dict) else read(path, tuple(leaf.shape))
        return out

    return walk(abstract, "")


def checked(x: np.ndarray, want: tuple[int, ...], path: str, name: str) -> np.ndarray:
    if tuple(x.shape) != want:
        raise JaxrsError(
            f"parameter {path} ({name}): checkpoint shape {tuple(x.shape)}, the model needs {want}"
        )
    return x


def renamed(table: dict[str, str], stacks: dict[str, str]) -> Callable[[str], str]:
    """`names` for `fill`: a path in `table` takes that name; a path under a stacked attribute
    (`stacks`: attribute -> checkpoint prefix with `{i}`) takes the prefix plus the rest of the path
    (looked up in `table` first); any other path is its own name."""

    def name(path: str) -> str:
        if path in table:
            return table[path]
        for attr, prefix in stacks.items():
            if path.startswith(attr + "."):
                rest = path[len(attr) + 1 :]
                return prefix + table.get(f"{attr}.*.{rest}", rest)
        return path

    return name
