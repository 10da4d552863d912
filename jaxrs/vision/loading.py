"""Vision-language HF folders: config.json with a `vision_config`, safetensors holding the tower, the
projector and the text model under the family's prefixes, preprocessor_config.json / processor_config.json.
The text model loads as its jaxrs text family (`text_config`); the tower's parameters fill its abstract
module state by path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrs.config import read_json
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.vision.encoder import VisionModel
from jaxrs.vision.registry import VisionFamily, family_for

log = logging.getLogger("jaxrs")


def vision_family(folder: Path) -> VisionFamily | None:
    """The folder's vision family, or None for a text-only model."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    return family_for(read_json(config).get("model_type", ""))


def first_found(get: Callable[[str], Any], names: list[str], what: str, where: Path) -> Any:
    for name in names:
        try:
            return get(name)
        except KeyError:
            continue
    raise ModelLoadError(where, f"missing tensor {what} (looked for {', '.join(names)})")


def _leaves(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    for key, node in tree.items():
        out += _leaves(node, (*prefix, key)) if isinstance(node, Mapping) else [((*prefix, key), node)]
    return out


def _read(get: Callable[[str], Any], name: str, shape: tuple, where: Path) -> np.ndarray:
    """One tensor of `shape`; a name with `{i}` reads the stacked layers `[shape[0], ...]` one by one. A
    tensor of another rank with as many elements is reshaped (a patch convolution read as a matrix)."""
    if "{i}" in name:
        return np.stack([_read(get, name.format(i=i), shape[1:], where) for i in range(shape[0])])
    array = np.asarray(get(name))
    if array.shape != shape and (array.ndim == len(shape) or array.size != int(np.prod(shape))):
        raise ModelLoadError(where, f"tensor {name} has shape {array.shape}, the config says {shape}")
    return array.reshape(shape)


def load_tower(
    family: VisionFamily, raw: Mapping, get: Callable[[str], Any], dtype: jnp.dtype, where: Path
) -> tuple[nnx.GraphDef, dict]:
    """The tower's graph and its parameters read from the checkpoint, each checked against its shape."""
    graph, state = nnx.split(nnx.eval_shape(lambda: family.tower(raw)))
    params: dict = {}
    for path, abstract in _leaves(state.to_pure_dict()):
        name = ".".join(str(p) for p in path)
        shape = tuple(abstract.shape)
        array = first_found(
            lambda n, shape=shape: _read(get, n, shape, where), family.tower_names(name), name, where
        )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array, dtype)
    return graph, params


def load_vision_model(
    folder: Path,
    family: VisionFamily,
    *,
    dtype: jnp.dtype,
    tokenizer: str | None,
    load_text: Callable,
    isq: str | None = None,
    isq_embeddings: str = "q8_0",
) -> Any:
    """A `LoadedModel` whose `vision` is the tower and processor. `load_text(config, getter)` loads the
    text model's parameters (the text loader's own path, with names mapped through the family)."""
    from jaxrs.loading import LoadedModel
    from jaxrs.loading.hf_folder import open_hf_tensors
    from jaxrs.loading.model_config import config_from_hf
    from jaxrs.tokenizer import Tokenizer

    start = time.perf_counter()
    raw = read_json(folder / "config.json")
    cfg = config_from_hf(family.text_config(raw), folder / "config.json")
    get = open_hf_tensors(folder, [])
    tok = Tokenizer.from_hf_folder(Path(tokenizer) if tokenizer else folder)

    def text_get(name: str) -> Any:
        return first_found(get, family.text_names(name), name, folder)

    if isq:  # the text model only: the tower stays in the compute dtype
        from collections import Counter

        from jaxrs.loading.isq import isq_summary, quantizing_getter

        tally: Counter = Counter()
        params = load_text(quantizing_getter(text_get, isq, embeddings=isq_embeddings, tally=tally), cfg)
        log.info("%s", isq_summary(isq, tally))
    else:
        params = load_text(text_get, cfg)
    try:
        processor = family.processor(folder, raw, tok)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(folder, f"bad image processor settings: {e}") from None
    graph, tower = load_tower(family, raw, get, dtype, folder)
    gen_path = folder / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.is_file() else {}
    vision = VisionModel(family, processor, graph, tower, dtype)
    log.info(
        "loaded %s vision-language model (%s text, %d layers) from %s in %.1f s",
        family.name,
        cfg.architecture,
        cfg.num_layers,
        folder,
        time.perf_counter() - start,
    )
    return LoadedModel(cfg, params, tok, generation_config, str(folder), vision=vision)


def require_vision(vision: VisionModel | None, source: str) -> VisionModel:
    if vision is None:
        raise JaxrsError(f"{Path(source).name} is a text-only model; it does not accept images")
    return vision
