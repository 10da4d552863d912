"""A FLUX pipeline from a diffusers folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`,
`text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`), optionally with the transformer from a
single-file checkpoint in Black Forest Labs' names. ISQ packs the transformer blocks' matrices."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrs.config import read_json
from jaxrs.errors import ModelLoadError
from jaxrs.images.bfl_names import bfl_getter
from jaxrs.images.clip_text import CLIP_NAMES, CLIP_STACKS, ClipTextConfig, ClipTextModel
from jaxrs.images.flow_match import SchedulerConfig
from jaxrs.images.flux_transformer import (
    FLUX_NAMES,
    FLUX_STACKS,
    FluxConfig,
    FluxTransformer,
    is_block_matrix,
)
from jaxrs.images.pipeline import Component, FluxPipeline
from jaxrs.images.t5_encoder import T5_STACKS, T5Config, T5Encoder, t5_names
from jaxrs.images.vae_decoder import VaeConfig, VaeDecoder, vae_name
from jaxrs.images.weights import abstract_state, fill, renamed
from jaxrs.loading.hf_folder import open_hf_tensors
from jaxrs.loading.isq import isq_summary
from jaxrs.ops import Kernels
from jaxrs.quant import IsqChoice

log = logging.getLogger("jaxrs.images")

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _config(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise ModelLoadError(folder, f"no {name} in this pipeline folder")
    return read_json(path)


def _tensors(folder: Path, optional_prefix: str = "") -> Callable[[str], np.ndarray]:
    """A getter over a component folder's safetensors; a missing tensor is a load error naming it.
    Names may be stored without `optional_prefix` (transformers 5 saves `CLIPTextModel` without
    `text_model.`)."""
    get = open_hf_tensors(folder, [])

    def checked(name: str) -> np.ndarray:
        for candidate in (name, name.removeprefix(optional_prefix)):
            try:
                return get(candidate)
            except KeyError:
                pass
        raise ModelLoadError(folder, f"missing tensor {name}")

    return checked


def _t5_tensors(folder: Path) -> Callable[[str], np.ndarray]:
    """T5's shared embedding is stored once, as `shared` or as the encoder's tied `embed_tokens`."""
    get = _tensors(folder)

    def tied(name: str) -> np.ndarray:
        if name == "shared.weight":
            try:
                return get(name)
            except ModelLoadError:
                return get("encoder.embed_tokens.weight")
        return get(name)

    return tied


def load_pipeline(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    isq: str | None = None,
    transformer_file: str | Path | None = None,
    kernels: Kernels = Kernels(),
) -> FluxPipeline:
    """Load every component of the pipeline folder at `path` (`transformer_file`: a BFL single file to
    take the transformer from instead of `transformer/`)."""
    folder = Path(path)
    if not is_diffusers_folder(folder):
        raise ModelLoadError(folder, "not a diffusers pipeline folder (no model_index.json)")
    for sub in SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise ModelLoadError(folder, f"no {sub}/ in this pipeline folder")

    flux_cfg = FluxConfig.from_dict(_config(folder, "transformer/config.json"))
    graph, abstract = abstract_state(lambda: FluxTransformer(flux_cfg))
    if transformer_file is not None:
        get = bfl_getter(str(transformer_file), flux_cfg.dim)
    else:
        get = _tensors(folder / "transformer")
    tally: Counter[IsqChoice] = Counter()
    params = fill(
        abstract,
        renamed(FLUX_NAMES, FLUX_STACKS),
        get,
        dtype,
        isq=isq,
        isq_paths=is_block_matrix,
        tally=tally,
    )
    if isq:
        log.info("transformer %s", isq_summary(isq, tally))
    transformer = Component(graph, params)

    vae_cfg = VaeConfig.from_dict(_config(folder, "vae/config.json"))
    graph, abstract = abstract_state(lambda: VaeDecoder(vae_cfg))
    vae = Component(graph, fill(abstract, vae_name, _tensors(folder / "vae"), dtype))

    clip_cfg = ClipTextConfig.from_dict(_config(folder, "text_encoder/config.json"))
    graph, abstract = abstract_state(lambda: ClipTextModel(clip_cfg))
    clip = Component(
        graph,
        fill(
            abstract,
            renamed(CLIP_NAMES, CLIP_STACKS),
            _tensors(folder / "text_encoder", "text_model."),
            dtype,
        ),
    )

    t5_cfg = T5Config.from_dict(_config(folder, "text_encoder_2/config.json"))
    graph, abstract = abstract_state(lambda: T5Encoder(t5_cfg))
    t5_get = _t5_tensors(folder / "text_encoder_2")
    t5 = Component(graph, fill(abstract, renamed(t5_names(t5_cfg), T5_STACKS), t5_get, dtype))

    try:
        scheduler = SchedulerConfig.from_dict(_config(folder, "scheduler/scheduler_config.json"))
    except ValueError as e:
        raise ModelLoadError(folder / "scheduler", str(e)) from None
    return FluxPipeline(flux_cfg, transformer, vae_cfg, vae, clip, t5, scheduler, dtype, kernels)
