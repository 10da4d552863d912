"""A final parameter tree (nested dicts of arrays and `QuantizedTensor`s) <-> one safetensors file.

Plain arrays are stored under their dotted key path. A `QuantizedTensor` is stored as one tensor per
field, `<path>.<field>`, with its format and logical `(out, in)` in the header's `__metadata__`, so the
packed bytes are written and read back verbatim (nothing is re-quantized). The metadata lists every
leaf with its key path, which rebuilds exactly the tree the model code was traced with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with NumPy, so safetensors can read and write it
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.quant import FORMATS, QuantizedTensor
from jaxrs.quant.tensor import make

TREE_KEY = "jaxrs.params"  # __metadata__ entry: JSON {name: {"path": [...], "format"/"dtype": ...}}
VERSION = 2  # 2: paths of the nnx module tree (`layers.attn.q_proj.weight`); 1: flat keys (`layers.q_proj`)

# Version 1's keys -> the module paths they became: `<key>_bias` is the `bias` beside `<key>`'s `weight`.
_V1_MODULES = {
    **{f"{p}_proj": ("attn", f"{p}_proj") for p in "qkvo"},
    "q_norm": ("attn", "q_norm"),
    "k_norm": ("attn", "k_norm"),
    **{f"{p}_proj": ("mlp", f"{p}_proj") for p in ("gate", "up", "down")},
    "router": ("mlp", "router"),
    **{f"experts_{p}": ("mlp", f"{p}_proj") for p in ("gate", "up", "down")},
}


def v1_path(path: list[str]) -> list[str]:
    """A version-1 key path (`["layers", "q_proj_bias"]`, `["embed"]`) as a module path."""
    *prefix, key = path
    base, leaf = (key[: -len("_bias")], "bias") if key.endswith("_bias") else (key, "weight")
    return [*prefix, *_V1_MODULES.get(base, (base,)), leaf]


def save_params(params: dict, file: Path) -> None:
    """Write `params` (host or device arrays) to `file`."""
    tensors: dict[str, np.ndarray] = {}
    leaves: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()  # leaf names and tensor names: joined key paths must stay distinct

    def claim(key: str) -> str:
        if key in taken:
            raise JaxrsError(f"parameter name {key!r} occurs twice once key paths are joined with '.'")
        taken.add(key)
        return key

    for path, leaf in _leaves(params):
        name = claim(".".join(path))
        if isinstance(leaf, QuantizedTensor):
            leaves[name] = {"path": path, "format": leaf.fmt, "out_in": list(leaf.out_in)}
            for field, array in leaf.arrays.items():
                tensors[claim(f"{name}.{field}")] = np.ascontiguousarray(array)
        else:
            tensors[name] = np.ascontiguousarray(leaf)
            leaves[name] = {"path": path, "dtype": tensors[name].dtype.name}
    meta = {TREE_KEY: json.dumps(leaves), "jaxrs.version": str(VERSION)}
    save_file(tensors, file, metadata=meta)


def load_params(file: Path, dtype: jnp.dtype) -> dict:
    """The tree `save_params` wrote, on the device; float arrays cast to `dtype`, packed ones verbatim."""
    from tqdm.auto import tqdm

    if not file.is_file():
        raise ModelLoadError(file, "no such file")
    try:
        with safe_open(file, framework="np") as f:
            leaves = _tree_metadata(f.metadata(), file)
            names = set(f.keys())
            params: dict = {}
            for name, entry in tqdm(
                leaves.items(), desc="Loading weights", unit="tensor", leave=False, delay=1.0
            ):
                value = _read_leaf(f, names, name, entry, dtype, file)
                _insert(params, entry["path"], value, file)
    except SafetensorError as e:
        raise ModelLoadError(file, f"unreadable safetensors file ({e})") from None
    return params


def _leaves(params: dict) -> list[tuple[list[str], Any]]:
    """(key path, leaf) pairs; only string-keyed dicts may hold the leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    out = []
    for keys, leaf in flat:
        if not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for k in keys):
            raise JaxrsError(f"cannot save parameter {jax.tree_util.keystr(keys)}: only dicts of arrays")
        out.append(([k.key for k in keys], leaf))
    return out


def _tree_metadata(meta: dict[str, str] | None, file: Path) -> dict[str, dict[str, Any]]:
    raw = (meta or {}).get(TREE_KEY)
    if raw is None:
        raise ModelLoadError(
            file, f"no {TREE_KEY!r} metadata: not a parameter file written by jaxrs quantize"
        )
    version = (meta or {}).get("jaxrs.version")
    if version not in ("1", str(VERSION)):
        raise ModelLoadError(file, f"parameter file version {version}, this jaxrs reads versions 1-{VERSION}")
    try:
        leaves = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(file, f"unreadable {TREE_KEY!r} metadata ({e})") from None
    if not isinstance(leaves, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), list) and e["path"] for e in leaves.values()
    ):
        raise ModelLoadError(file, f"malformed {TREE_KEY!r} metadata")
    if version == "1":
        leaves = {name: entry | {"path": v1_path(entry["path"])} for name, entry in leaves.items()}
    return leaves


def _read_leaf(f, names: set[str], name: str, entry: dict, dtype: jnp.dtype, file: Path):
    def tensor(key: str) -> np.ndarray:
        if key not in names:
            raise ModelLoadError(file, f"tensor {key!r} is missing")
        return f.get_tensor(key)

    fmt = entry.get("format")
    if fmt is None:
        array = tensor(name)
        return (
            jnp.asarray(array, dtype) if jnp.issubdtype(array.dtype, jnp.floating) else jax.device_put(array)
        )
    if fmt not in FORMATS:
        raise ModelLoadError(file, f"tensor {name!r} has unknown format {fmt!r}")
    arrays = {field: tensor(f"{name}.{field}") for field in FORMATS[fmt].field_names}
    try:
        return jax.device_put(make(fmt, tuple(entry["out_in"]), arrays))
    except (JaxrsError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(file, f"tensor {name!r}: {e}") from None


def _insert(tree: dict, path: list[str], value: Any, file: Path) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ModelLoadError(file, f"parameter {'.'.join(path)!r} lies under an array")
    if path[-1] in node:
        raise ModelLoadError(file, f"parameter {'.'.join(path)!r} is listed twice")
    node[path[-1]] = value
