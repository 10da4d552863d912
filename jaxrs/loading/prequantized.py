"""Pre-quantized model folders: quantize once (`jaxrs quantize`), then load the packed weights directly.

A folder holds:
- `jaxrs_config.json`: a marker (`format`, `version`) and the `ModelConfig`, serialized exactly;
- `model.safetensors`: the final parameter tree, packed tensors as their raw fields (`param_file`);
- tokenizer.json, tokenizer_config.json and, when there is one, generation_config.json.

Loading reads the tree back as it was saved, so nothing is quantized again and the jitted model sees the
same pytree structure as after in-situ quantization.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax.numpy as jnp

from jaxrs.config import read_json
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.loading import LoadedModel
from jaxrs.loading.checkpoint import check_params
from jaxrs.loading.config_dict import config_from_dict, config_to_dict
from jaxrs.loading.param_file import load_params, save_params
from jaxrs.loading.tokenizer_files import check_same_tokenizer, save_tokenizer

log = logging.getLogger("jaxrs")

CONFIG_FILE = "jaxrs_config.json"  # its presence makes a folder a pre-quantized model
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
FORMAT = "jaxrs-quantized"
VERSION = 1


def is_quantized_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save_quantized(loaded: LoadedModel, out: Path) -> int:
    """Write `loaded` (usually an ISQ model) as a folder `load_quantized` reads; returns bytes written.

    `out` must be new, empty, or an earlier such folder (overwritten). The marker file is written last,
    so an interrupted save is not mistaken for a model.
    """
    from jaxrs.tokenizer import Tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JaxrsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_quantized_folder(out):
        raise JaxrsError(f"{out}: folder is not empty; choose a new folder for the quantized model")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    (out / GENERATION_FILE).unlink(missing_ok=True)

    config = config_to_dict(loaded.config)
    if config_from_dict(json.loads(json.dumps(config))) != loaded.config:
        raise JaxrsError(f"the config of {loaded.source} does not survive JSON; cannot save it")
    generation_config = save_tokenizer(loaded.tokenizer, out, loaded.generation_config)
    if generation_config:
        _write_json(out / GENERATION_FILE, generation_config)
    check_same_tokenizer(loaded.tokenizer, Tokenizer.from_hf_folder(out), out)
    save_params(loaded.params, out / WEIGHTS_FILE)
    _write_json(
        out / CONFIG_FILE, {"format": FORMAT, "version": VERSION, "source": loaded.source, "config": config}
    )
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info("wrote %s: %d bytes (%.1f MiB)", out, written, written / 2**20)
    return written


def load_quantized(path: Path, *, dtype: jnp.dtype, tokenizer: str | None = None) -> LoadedModel:
    """A folder `save_quantized` wrote; float arrays in `dtype`, packed tensors exactly as saved.
    `tokenizer`: an HF tokenizer folder to use instead of the saved one."""
    from jaxrs.tokenizer import Tokenizer

    start = time.perf_counter()
    config_file = path / CONFIG_FILE
    meta = read_json(config_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelLoadError(config_file, f'not a jaxrs quantized model (expected "format": {FORMAT!r})')
    if meta.get("version") != VERSION:
        raise ModelLoadError(
            config_file, f"format version {meta.get('version')!r}; this jaxrs reads version {VERSION}"
        )
    try:
        cfg = config_from_dict(meta.get("config"))
    except ValueError as e:
        raise ModelLoadError(config_file, f"invalid model config ({e})") from None
    params = load_params(path / WEIGHTS_FILE, jnp.dtype(dtype))
    try:
        check_params(params, cfg)
    except JaxrsError as e:
        raise ModelLoadError(path / WEIGHTS_FILE, f"{e} (model {cfg.architecture})") from None
    tok = Tokenizer.from_hf_folder(Path(tokenizer) if tokenizer else path)
    gen_file = path / GENERATION_FILE
    generation_config = read_json(gen_file) if gen_file.is_file() else {}
    log.info(
        "loaded pre-quantized %s (%s, %d layers) from %s in %.1f s",
        cfg.name or path.name,
        cfg.architecture,
        cfg.num_layers,
        path,
        time.perf_counter() - start,
    )
    return LoadedModel(cfg, params, tok, generation_config, str(path))


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
