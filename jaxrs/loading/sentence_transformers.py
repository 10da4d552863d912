"""Sentence-embedding model folders: what sentence-transformers' `modules.json` pipeline says (which folder
holds the transformer, the pooling mode, whether vectors are normalized, the longest input), and the
BERT-family encoder weights read into the encoder's state.

A folder is an embedding model when it has `modules.json` (a sentence-transformers folder; its
transformer may be an encoder or one of the decoder families) or when its config.json names an encoder
(`BertModel`...), which without `modules.json` pools as sentence-transformers would: mean, unnormalized.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from jaxrs.config import read_json
from jaxrs.errors import ModelLoadError
from jaxrs.models import bert
from jaxrs.models.pooling import MODES


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """How token states become a sentence vector, and the limits a request is checked against.

    pooling: modes in `pooling.MODES`; normalize: unit vectors (a `Normalize` module); max_tokens: the
    longest input (sentence_bert_config.json's `max_seq_length`; None: the model's positions);
    matryoshka_dims: None if the model does not declare Matryoshka training (a request's `dimensions` is
    then refused), () if any size up to the full one is fine, else the sizes allowed.
    """

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_tokens: int | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    dense: tuple[Dense, ...] = ()


@dataclasses.dataclass(frozen=True)
class Dense:
    """A `Dense` module after pooling (EmbeddingGemma has two): `activation(x @ W.T + b)`; its weights
    are in `folder`'s model.safetensors (`linear.weight`, `linear.bias`)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of DENSE_ACTIVATIONS


# the last part of a Dense module's `activation_function` -> the name `embedding.activate` knows
DENSE_ACTIVATIONS = {
    "Identity": "identity",
    "Tanh": "tanh",
    "ReLU": "relu",
    "GELU": "gelu",
    "Sigmoid": "sigmoid",
    "SiLU": "silu",
}

# the last part of modules.json's `type` -> what it is
_TRANSFORMER, _POOLING, _DENSE, _NORMALIZE = "Transformer", "Pooling", "Dense", "Normalize"


def is_embedding_folder(path: Path) -> bool:
    """A sentence-transformers folder, or an HF folder whose config.json names a BERT-family encoder."""
    if not path.is_dir():
        return False
    if (path / "modules.json").is_file():
        return True
    config = path / "config.json"
    return config.is_file() and bert.encoder_architecture(read_json(config)) is not None


def read_embedding_folder(path: Path, *, default_pooling: tuple[str, ...]) -> tuple[Path, EmbeddingSpec]:
    """(the transformer's folder, the spec) of an embedding model folder. Without modules.json the
    transformer is the folder itself, pooled with `default_pooling`, unnormalized."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return path, dataclasses.replace(_read_limits(path, path), pooling=default_pooling)
    modules = read_json(modules_file)
    if not isinstance(modules, list):
        raise ModelLoadError(modules_file, "expected a list of modules")
    transformer, pooling, normalize, dense = None, default_pooling, False, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = path / module.get("path", "")
        if kind == _TRANSFORMER:
            transformer = where
        elif kind == _POOLING:
            pooling = _pooling_modes(where / "config.json")
        elif kind == _DENSE and not normalize:
            dense.append(_read_dense(where))
        elif kind == _NORMALIZE:
            normalize = True
        else:
            raise ModelLoadError(
                modules_file, f"unsupported sentence-transformers module {module.get('type')!r}"
            )
    if transformer is None:
        raise ModelLoadError(modules_file, "no Transformer module")
    spec = dataclasses.replace(
        _read_limits(path, transformer), pooling=pooling, normalize=normalize, dense=tuple(dense)
    )
    return transformer, spec


def _read_dense(folder: Path) -> Dense:
    config_file = folder / "config.json"
    raw = read_json(config_file)
    activation = str(raw.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise ModelLoadError(
            config_file,
            f"unsupported Dense activation {activation!r} (supported: {', '.join(DENSE_ACTIVATIONS)})",
        )
    try:
        in_features, out_features = int(raw["in_features"]), int(raw["out_features"])
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(config_file, "a Dense module needs integer in_features, out_features") from None
    bias = bool(raw.get("bias", True))
    return Dense(folder, in_features, out_features, bias, DENSE_ACTIVATIONS[activation])


def load_dense(dense: Dense, dtype: jnp.dtype) -> dict[str, jnp.ndarray]:
    """A Dense module's weight `[out, in]` (and bias), checked against its config."""
    from safetensors.numpy import load_file

    file = dense.folder / "model.safetensors"
    if not file.is_file():
        raise ModelLoadError(dense.folder, "a Dense module without model.safetensors (only safetensors load)")
    tensors = load_file(file)
    want = {"linear.weight": (dense.out_features, dense.in_features)}
    if dense.bias:
        want["linear.bias"] = (dense.out_features,)
    for name, shape in want.items():
        if name not in tensors:
            raise ModelLoadError(file, f"missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(file, f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return {n.removeprefix("linear."): jnp.asarray(tensors[n], dtype) for n in want}


def _pooling_modes(config_file: Path) -> tuple[str, ...]:
    raw = read_json(config_file)
    modes = tuple(mode for mode, key in MODES.items() if raw.get(key))
    if not modes and isinstance(raw.get("pooling_mode"), str):  # a newer spelling: one mode by name
        named = {"cls": "cls", "max": "max", "mean": "mean", "lasttoken": "lasttoken"}
        modes = tuple(named[m] for m in [raw["pooling_mode"]] if m in named)
    if not modes:
        raise ModelLoadError(config_file, f"no pooling mode we support is on (supported: {', '.join(MODES)})")
    return modes


def _read_limits(folder: Path, transformer: Path) -> EmbeddingSpec:
    """max_seq_length and the Matryoshka declaration (`matryoshka_dimensions` or `is_matryoshka` in
    config.json or config_sentence_transformers.json)."""
    bert_config = transformer / "sentence_bert_config.json"
    max_tokens = read_json(bert_config).get("max_seq_length") if bert_config.is_file() else None
    dims: tuple[int, ...] | None = None
    for file in (transformer / "config.json", folder / "config_sentence_transformers.json"):
        raw = read_json(file) if file.is_file() else {}
        if raw.get("matryoshka_dimensions"):
            dims = tuple(sorted(int(d) for d in raw["matryoshka_dimensions"]))
        elif raw.get("is_matryoshka") and dims is None:
            dims = ()
    return EmbeddingSpec(max_tokens=max_tokens, matryoshka_dims=dims)


def load_encoder(folder: Path, dtype: jnp.dtype) -> tuple[bert.EncoderConfig, dict]:
    """An encoder's config and state from its HF folder (tensors named as BertModel saves them, or with
    the `bert.`/`roberta.` prefix of a masked-LM checkpoint)."""
    from jaxrs.loading.checkpoint import fill_params, tree_shapes
    from jaxrs.loading.hf_folder import open_hf_tensors

    cfg = bert.encoder_config(read_json(folder / "config.json"), folder / "config.json")
    try:
        prefix = ""
        get = open_hf_tensors(folder, bert.hf_weight_names(cfg))
    except ModelLoadError as plain:
        prefix = f"{cfg.architecture}."
        try:
            get = open_hf_tensors(folder, bert.hf_weight_names(cfg, prefix))
        except ModelLoadError:
            raise plain from None
    shapes = tree_shapes(bert.model_graph(cfg)[1])
    sources = {path: bert.HF_NAMES[path] for path in shapes}
    if prefix:
        sources = {
            path: name if path.startswith("layers.") else prefix + name for path, name in sources.items()
        }
    params = fill_params(
        get, shapes, sources, dtype, num_layers=cfg.num_layers, layer_prefix=prefix + bert.LAYER_PREFIX
    )
    return cfg, params
