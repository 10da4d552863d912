"""Filling a vision tower's parameters from a Hugging Face folder's safetensors.

Tower modules name their attributes after transformers' parameter names, so a parameter path maps to its
checkpoint name by joining the path with dots under a prefix; stacked layers (the leading axis of
`layers`) read `layers.{i}` one layer at a time and are stacked here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from jaxrs.errors import ModelLoadError
from jaxrs.loading.hf_folder import open_hf_tensors

Rename = Callable[[str], str]  # dotted parameter path -> checkpoint name, "{i}" where a layer index goes


def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    out = []
    for key, node in tree.items():
        path = (*prefix, str(key))
        out += _leaves(node, path) if isinstance(node, dict) else [(path, node)]
    return out


def _set(tree: dict, path: tuple, leaf: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = leaf


def load_tower_params(folder: str | Path, module: nnx.Module, rename: Rename) -> dict:
    """The parameter tree of `module` (built abstractly or not) read from `folder`'s safetensors in f32.

    A checkpoint tensor with the same number of elements as the slot is reshaped into it (a patch
    convolution `[hidden, 3, p, p]` read into a `[hidden, 3 * p * p]` matrix); anything else is an error
    naming the tensor."""
    abstract = nnx.state(module).to_pure_dict()
    leaves = _leaves(abstract)
    names = {path: rename(".".join(path)) for path, _ in leaves}
    needed = []
    for path, leaf in leaves:
        name = names[path]
        needed += [name.format(i=i) for i in range(leaf.shape[0])] if "{i}" in name else [name]
    get = open_hf_tensors(Path(folder), needed)
    params: dict = {}
    for path, leaf in leaves:
        name = names[path]
        if "{i}" in name:
            layers = [name.format(i=i) for i in range(leaf.shape[0])]
            array = np.stack([_fit(get(layer), leaf.shape[1:], layer) for layer in layers])
        else:
            array = _fit(get(name), leaf.shape, name)
        _set(params, path, array)
    return params


def _fit(array: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.size != int(np.prod(shape)):
        raise ModelLoadError(name, f"has shape {list(array.shape)}, the model expects {list(shape)}")
    return array.reshape(shape)
