"""Model sources -> (ModelConfig, parameter pytree, tokenizer).

A source is a GGUF file, a Hugging Face model folder, a folder holding one GGUF, a folder written by
`jaxrs quantize` (`prequantized`), a Hub repo id, a model catalog name (`catalog`: a GGUF fetched from
the package registry), or nothing (the embedded demo model). Every format ends in the same parameter
tree (the state of the model's module tree, `loading.checkpoint`), so one model implementation serves
them all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from jaxrs.config import ModelConfig, read_json
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.host_memory import release_freed
from jaxrs.quant.tensor import tree_nbytes

if TYPE_CHECKING:
    from jaxrs.quant.policy import IsqChoice
    from jaxrs.tokenizer import Tokenizer

log = logging.getLogger("jaxrs")


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: `params` is the state of its `flax.nnx` module tree as nested dicts by parameter
    path (`params["layers"]["attn"]["q_proj"]["weight"]`), which `models.decoder.merge` turns back into
    the module inside a jitted step."""

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    generation_config: dict[str, Any]  # default sampling values (generation_config.json)
    source: str
    vision: Any = None  # jaxrs.vision.encoder.VisionModel of a vision-language model


def resolve_source(model: str | None, gguf_file: str | None = None) -> tuple[str, Path]:
    """("gguf" | "hf" | "quantized", local path) for a user-given model string."""
    from jaxrs.loading.catalog import fetch_model, find_model
    from jaxrs.loading.demo import fetch_demo_model
    from jaxrs.loading.hub import download_repo, looks_like_repo_id
    from jaxrs.loading.prequantized import is_quantized_folder

    if model is None:
        return "gguf", fetch_demo_model()
    path = Path(model).expanduser()
    if path.is_file():
        return "gguf", path
    if path.is_dir():
        if gguf_file:
            return "gguf", path / gguf_file
        if is_quantized_folder(path):  # written by `jaxrs quantize`
            return "quantized", path
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if ggufs:
            raise ModelLoadError(
                path,
                f"several GGUF files here; choose one with --gguf-file: {', '.join(g.name for g in ggufs)}",
            )
        raise ModelLoadError(path, "neither config.json nor a GGUF file in this folder")
    if entry := find_model(model):  # a local file of that name came first
        return "gguf", fetch_model(entry)
    if looks_like_repo_id(model):
        local = download_repo(model, gguf_file)
        return ("hf" if local.is_dir() else "gguf"), local
    raise ModelLoadError(
        path, "no such file or directory, nor a model catalog name (`jaxrs fetch` lists them)"
    )


def load_model(
    model: str | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str | jnp.dtype = "float32",
    tokenizer: str | None = None,
    packed: bool | None = None,
    isq: str | None = None,
    isq_embeddings: str = "q8_0",
    mmproj: str | None = None,
    device_layout: bool = True,
) -> LoadedModel:
    """Load config, parameters (as `dtype` device arrays) and tokenizer from any supported source.

    `packed`: a GGUF's quantized tensors stay in their format on the device (matmuls read them
    packed); False dequantizes them to `dtype`. Unset: packed (`options.LOAD_PACKED`) unless `isq`
    asks for another format, which then quantizes every tensor from its float values. `isq`: quantize
    float weights into this format while loading (`jaxrs.quant.isq_format` says which format each
    tensor takes; one line logs the tally). `isq_embeddings`: how ISQ stores
    the embedding and output head (`"q8_0"`, `"isq"` or `"float"`, see `jaxrs.quant.policy`). `mmproj`:
    a llama.cpp mmproj GGUF (CLIP tower + LLaVA projector) to serve images with a GGUF text model.
    `device_layout`: packed tensors (from the file, ISQ or a pre-quantized folder) take the layout the
    device reads fastest (`loading.device_layout`: on XLA:CPU, byte codes); False keeps their formats.
    """
    from jaxrs.engine.options import LOAD_PACKED
    from jaxrs.loading.checkpoint import hf_weight_names, load_params
    from jaxrs.loading.device_layout import log_moves, relaid_getter, relaid_tree, relays_packed_weights
    from jaxrs.tokenizer import Tokenizer

    if packed is None:
        packed = LOAD_PACKED and not isq
    kind, path = resolve_source(model, gguf_file)
    start = time.perf_counter()
    relaid: Counter[str] = Counter()  # "Q4_1 -> U8M" -> tensors moved
    relay = relays_packed_weights(device_layout)
    tally: Counter[IsqChoice] = Counter()  # ISQ: tensors per (format, reason)
    dtype = jnp.dtype(dtype)
    if kind == "quantized":
        from jaxrs.loading.prequantized import load_quantized

        if isq:
            raise JaxrsError(f"{path} is already quantized; drop --isq (or quantize the original model)")
        loaded = load_quantized(path, dtype=dtype, tokenizer=tokenizer)
        if relay:
            loaded = dataclasses.replace(loaded, params=relaid_tree(loaded.params, relaid))
            log_moves(relaid)
        return loaded
    if mmproj:
        from jaxrs.vision.mmproj import load_mmproj

        loaded = load_model(
            model,
            gguf_file=gguf_file,
            dtype=dtype,
            tokenizer=tokenizer,
            packed=packed,
            isq=isq,
            isq_embeddings=isq_embeddings,
            device_layout=device_layout,
        )
        return dataclasses.replace(loaded, vision=load_mmproj(mmproj, loaded.tokenizer, dtype))
    if kind == "gguf":
        from jaxrs.loading.ggml_file import is_ggml, read_ggml
        from jaxrs.loading.gguf_file import gguf_config, open_gguf_tensors
        from jaxrs.loading.gguf_reader import open_gguf, read_metadata
        from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf

        if path.is_file() and is_ggml(path):  # legacy GGML: read into GGUF's shape
            reader = read_ggml(path)
            meta = reader.metadata
        else:
            reader = open_gguf(path)
            meta = read_metadata(reader)
        cfg = gguf_config(reader, meta, path)
        tok = Tokenizer.from_hf_folder(Path(tokenizer)) if tokenizer else tokenizer_from_gguf(meta, path)
        # The key/value fields (the vocabulary: tens of MB for a 262k vocabulary) are read: free them
        # before the weights arrive.
        del meta
        reader.metadata.clear()
        relayout = _cpu_relayout(reader, relaid) if relay and packed else None
        get = open_gguf_tensors(reader, cfg, path, packed=packed, relayout=relayout)
        generation_config: dict[str, Any] = {}
    else:
        from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
        from jaxrs.vision.loading import load_vision_model, vision_family

        if family := vision_family(path):  # a vision-language folder: the text model beside a tower

            def load_text(get, cfg: ModelConfig) -> dict:
                return load_params(relaid_getter(get, relaid) if relay else get, cfg, dtype)

            loaded = load_vision_model(
                path,
                family,
                dtype=dtype,
                tokenizer=tokenizer,
                load_text=load_text,
                isq=isq,
                isq_embeddings=isq_embeddings,
            )
            log_moves(relaid)
            return loaded
        cfg = load_hf_config(path)
        get = open_hf_tensors(path, hf_weight_names(cfg))
        tok = Tokenizer.from_hf_folder(Path(tokenizer) if tokenizer else path)
        gen_path = path / "generation_config.json"
        generation_config = read_json(gen_path) if gen_path.is_file() else {}
    if isq:
        from jaxrs.loading.isq import isq_summary, quantizing_getter

        get = quantizing_getter(get, isq, embeddings=isq_embeddings, tally=tally)
        if relay:  # ISQ's formats into the device's layout, as a packed GGUF's (its tensors already are)
            get = relaid_getter(get, relaid)
    try:
        params = load_params(_with_progress(get, cfg, "Quantizing" if isq else "Loading weights"), cfg, dtype)
    except ModelLoadError:
        raise
    except JaxrsError as e:  # the checkpoint does not fit the model its config describes
        raise ModelLoadError(path, str(e)) from None
    release_freed()  # the host buffers the tensors passed through
    log.info(
        "loaded %s (%s, %d layers) from %s in %.1f s, weights %.1f MiB",
        cfg.name or path.name,
        cfg.architecture,
        cfg.num_layers,
        path,
        time.perf_counter() - start,
        tree_nbytes(params) / 2**20,
    )
    if isq:
        log.info("%s", isq_summary(isq, tally))
    log_moves(relaid)
    return LoadedModel(cfg, params, tok, generation_config, str(path))


def _cpu_relayout(reader, moved: Counter[str]):
    """The GGUF reader's relayout (row by row) into the CPU layout (`loading.device_layout`); `moved`
    counts the file's tensors it moves, by format."""
    from jaxrs.loading.device_layout import count_moves
    from jaxrs.quant.formats import format_of_ggml_type
    from jaxrs.quant.transcode import cpu_layout

    for tensor in reader.tensors:
        try:
            fmt = format_of_ggml_type(tensor.tensor_type)
        except JaxrsError:  # a type the loader refuses, naming the tensor
            continue
        if len(tensor.shape) >= 2:
            count_moves([fmt], moved)
    return cpu_layout


def _with_progress(get, cfg: ModelConfig, desc: str):
    """Wrap a tensor getter with a progress bar over the tensors the family will ask for."""
    from tqdm.auto import tqdm

    from jaxrs.loading.checkpoint import hf_weight_names

    total = len(hf_weight_names(cfg))
    bar = tqdm(total=total, desc=desc, unit="tensor", leave=False, delay=1.0)

    def counted(name: str):
        value = get(name)
        bar.update(1)
        if bar.n >= total:
            bar.close()
        return value

    return counted
