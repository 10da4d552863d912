"""Checkpoint tensors -> the model's state: the abstract module tree says which parameters exist and their
shapes; the family's `CheckpointNames` say which tensor fills each; per-layer tensors (and experts) are
stacked, fused tensors split (`Rows`), packed tensors kept packed.

Every source (HF folder, GGUF, GGML, with or without ISQ) is a getter of HF-named tensors, so this one
function fills the tree for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.host_memory import release_freed
from jaxrs.loading.layer_stack import LayerStack
from jaxrs.loading.names import LAYER_PREFIX, Experts, Rows, Source, source_names
from jaxrs.models.decoder import model_graph, set_path
from jaxrs.models.registry import family
from jaxrs.quant import QuantizedTensor
from jaxrs.quant import stack as stack_quantized
from jaxrs.quant.transcode import unify_formats

Getter = Callable[[str], np.ndarray | QuantizedTensor]


def tree_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every leaf of a parameter tree (a packed tensor is one leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    return {".".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted parameter path -> shape, for every parameter of the model (layers stacked)."""
    return tree_shapes(model_graph(cfg)[1])


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raise `JaxrsError` naming the first parameter `params` lacks, has too many, or has in another
    shape than the config's model (for trees read back whole, such as a pre-quantized folder)."""
    have, want = tree_shapes(params), parameter_shapes(cfg)
    for path, shape in want.items():
        if path not in have:
            raise JaxrsError(f"parameter {path} is missing")
        if have[path] != shape:
            raise JaxrsError(f"parameter {path} has shape {have[path]}, the config needs {shape}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise JaxrsError(f"unexpected parameter(s) {', '.join(extra)}")


def _sources(cfg: ModelConfig) -> dict[str, Source]:
    """Parameter path -> checkpoint source, for the parameters this config's model has."""
    table, paths = family(cfg.architecture).names.hf(cfg), parameter_shapes(cfg)
    missing = [path for path in paths if path not in table]
    if missing:
        raise JaxrsError(f"{cfg.architecture}: no checkpoint name for parameter(s) {', '.join(missing)}")
    return {path: table[path] for path in paths}


def hf_weight_names(cfg: ModelConfig) -> list[str]:
    """Every checkpoint tensor the model needs (a fused tensor once)."""
    names, suffixes = [], []
    for path, source in _sources(cfg).items():
        if path.startswith(LAYER_PREFIX):
            suffixes += source_names(source, cfg)
        else:
            names.append(source)
    suffixes = list(dict.fromkeys(suffixes))
    return names + [f"model.layers.{i}.{s}" for i in range(cfg.num_layers) for s in suffixes]


def take(x: np.ndarray | QuantizedTensor, index: int | slice) -> np.ndarray | QuantizedTensor:
    """Part of a checkpoint tensor: an int picks along the leading axis (an expert of a 3-D expert
    tensor), a slice picks rows (`out`) of a fused matrix or bias. Packed tensors stay packed (every
    format quantizes rows independently, so a row range of one is the same format over those rows)."""
    if isinstance(index, int):
        return x[index]
    if isinstance(x, QuantizedTensor):
        arrays = {n: a[..., index, :] for n, a in x.arrays.items()}
        rows = len(range(*index.indices(x.out_in[0])))
        return QuantizedTensor(x.fmt, (rows, x.out_in[1]), arrays)
    return x[..., index, :] if x.ndim >= 2 else x[index]


def stack(tensors: list, name: str = "") -> np.ndarray | QuantizedTensor:
    """Stack per-layer (or per-expert) tensors on a new leading axis, packed ones staying packed (in
    one format: see `unify_formats`)."""
    if any(isinstance(t, QuantizedTensor) for t in tensors):
        if not all(isinstance(t, QuantizedTensor) for t in tensors):
            raise ValueError("a stacked parameter mixes packed and float tensors")
        return stack_quantized(unify_formats(tensors, name))
    return np.stack(tensors)


def load_params(get: Getter, cfg: ModelConfig, dtype: jnp.dtype) -> dict:
    """The decoder's state (nested dicts by parameter path) from a getter of HF-named tensors (see
    `fill_params`)."""
    return fill_params(
        get,
        parameter_shapes(cfg),
        _sources(cfg),
        dtype,
        num_layers=cfg.num_layers,
        expert_names=lambda source: source_names(source, cfg),
    )


def fill_params(
    get: Getter,
    shapes: dict[str, tuple[int, ...]],
    sources: dict[str, Source],
    dtype: jnp.dtype,
    *,
    num_layers: int,
    layer_prefix: str = "model.layers.{i}.",
    expert_names: Callable[[Experts], list[str]] | None = None,
) -> dict:
    """A model's state from a getter of HF-named tensors, for any module tree: `shapes` and `sources`
    give each parameter path its shape and checkpoint source; stacked (`layers.`) sources are relative
    to `layer_prefix`. Float arrays are cast to `dtype`, packed `QuantizedTensor`s kept
    packed. A tensor whose shape is not the parameter's is an error naming both. A fused tensor that
    `Rows` entries split is read once and kept until its last part has been taken."""
    parts_left: dict[str, int] = {}  # fused suffix -> Rows entries reading it (per layer)
    for path, source in sources.items():
        if isinstance(source, Rows) and path.startswith(LAYER_PREFIX):
            parts_left[source.name] = parts_left.get(source.name, 0) + 1
    fused: dict[str, list] = {}  # full name -> [tensor, parts still to take]

    def read(i: int, source: Source) -> np.ndarray | QuantizedTensor:
        prefix = layer_prefix.format(i=i)
        if isinstance(source, Experts):
            names = [prefix + n for n in expert_names(source)]
            return stack([get(n) for n in names], source.name)
        if not isinstance(source, Rows):
            return get(prefix + source)
        name = prefix + source.name
        entry = fused.setdefault(name, [None, parts_left[source.name]])
        if entry[0] is None:
            entry[0] = get(name)
        part, entry[1] = take(entry[0], slice(source.start, source.stop)), entry[1] - 1
        if entry[1] == 0:
            del fused[name]
        return part

    def checked(x: np.ndarray | QuantizedTensor, want: tuple[int, ...], path: str, name: str):
        if tuple(x.shape) != want:
            raise JaxrsError(
                f"parameter {path} ({name}): checkpoint shape {tuple(x.shape)}, the config needs {want}"
            )
        return x

    def layer(i: int, path: str, source: Source) -> np.ndarray | QuantizedTensor:
        return checked(read(i, source), shapes[path][1:], path, f"layer {i}: {source}")

    def put(x: np.ndarray | QuantizedTensor) -> jax.Array | QuantizedTensor:
        as_is = isinstance(x, QuantizedTensor) or x.dtype == dtype
        return jax.device_put(x) if as_is else jnp.asarray(x, dtype=dtype)

    params: dict = {}
    for path, source in sources.items():  # layers first, as the getters' progress bars expect
        if path.startswith(LAYER_PREFIX):
            # Each layer written into the preallocated stack as it is read (its host copies go before
            # the next one's arrive); on CPU the aligned stack becomes the device array without a copy.
            stacked = LayerStack(num_layers, dtype, path)
            for i in range(num_layers):
                stacked.set(i, layer(i, path, source))
            set_path(params, path.split("."), put(stacked.value()))
            del stacked
            release_freed()  # the layers' host copies, before the next parameter's arrive
    for path, source in sources.items():
        if not path.startswith(LAYER_PREFIX):
            set_path(params, path.split("."), put(checked(get(source), shapes[path], path, source)))
            release_freed()
    return params
