"""Model sources: HF folders, GGUF files and folders, Hub repo ids resolved offline from a laid-out cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from jaxrs.errors import ModelLoadError
from jaxrs.loading import load_model, resolve_source
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

TINY = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    eos_token_id=2,
    bos_token_id=1,
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        (snapshot / name).symlink_to(source)


def load_offline(hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from jaxrs.loading import load_model; "
        "m = load_model(sys.argv[1], gguf_file=(sys.argv[2] if len(sys.argv) > 2 else None)); "
        "print(m.config.architecture, m.config.num_layers, m.source)"
    )
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.9}))
    return folder


def test_hf_folder_loads_with_generation_config(tiny_folder):
    loaded = load_model(str(tiny_folder))
    assert loaded.config.num_layers == 2 and loaded.config.num_kv_heads == 2
    assert loaded.generation_config == {"temperature": 0.7, "top_p": 0.9}
    assert loaded.tokenizer.encode("w5 w6") == [5, 6]


def test_hub_repo_id_resolves_offline_from_cache(tiny_folder, tmp_path):
    files = {p.name: p for p in tiny_folder.iterdir()}
    lay_out_hub_cache(tmp_path, "acme/tiny-llama", files)
    done = load_offline(tmp_path, "acme/tiny-llama")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["llama", "2"]
    assert f"snapshots/{COMMIT}" in done.stdout


def test_hub_repo_with_several_ggufs_needs_a_choice(demo_gguf, tmp_path):
    lay_out_hub_cache(tmp_path, "acme/smol-gguf", {"a.Q4_1.gguf": demo_gguf, "b.Q4_1.gguf": demo_gguf})
    done = load_offline(tmp_path, "acme/smol-gguf")
    assert done.returncode != 0
    assert "several GGUF files; choose one with --gguf-file: a.Q4_1.gguf, b.Q4_1.gguf" in done.stderr
    done = load_offline(tmp_path, "acme/smol-gguf", "b.Q4_1.gguf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["llama", "30"] and done.stdout.strip().endswith("b.Q4_1.gguf")


def test_hub_repo_missing_from_offline_cache(tmp_path):
    done = load_offline(tmp_path, "acme/absent")
    assert done.returncode != 0
    assert "acme/absent: not in the local Hugging Face cache" in done.stderr


def test_folder_with_one_gguf_and_with_several(demo_gguf, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").symlink_to(demo_gguf)
    assert resolve_source(str(tmp_path / "one")) == ("gguf", tmp_path / "one" / "m.gguf")
    (tmp_path / "one" / "n.gguf").symlink_to(demo_gguf)
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_source(str(tmp_path / "one"))
    assert resolve_source(str(tmp_path / "one"), "n.gguf") == ("gguf", tmp_path / "one" / "n.gguf")
