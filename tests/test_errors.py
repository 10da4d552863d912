"""Bad model sources: one clear message naming the file and the problem, and no traceback from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from jaxrs.errors import ModelLoadError
from jaxrs.loading import load_model
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

TINY = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxrs.cli", "--log-level", "ERROR", "run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )


def _env():
    import os

    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def assert_clean_failure(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, line


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="nope.gguf: no such file or directory"):
        load_model(str(missing))
    assert_clean_failure(run_cli("--model", str(missing), "--prompt", "hi"), str(missing), "no such file")


def test_truncated_gguf(demo_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(demo_gguf, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    assert_clean_failure(run_cli("--model", str(cut), "--prompt", "hi"), str(cut), "truncated")


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(bogus))


def test_unknown_architecture(tmp_path):
    save_tiny_hf_model(TINY, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: unknown architecture \['FancyNewForCausalLM'\]"):
        load_model(str(tmp_path))
    assert_clean_failure(
        run_cli("--model", str(tmp_path), "--prompt", "hi"), "config.json", "FancyNewForCausalLM"
    )


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny_hf_model(TINY, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: missing tensor\(s\) model\.layers\.1\.mlp\.down_proj"
    ):
        load_model(str(tmp_path))


def test_tensor_of_the_wrong_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny_hf_model(TINY, tmp_path)
    save_tiny_tokenizer(tmp_path, TINY.vocab_size)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, weights)
    with pytest.raises(
        ModelLoadError,
        match=rf"{tmp_path}: parameter layers\.attn\.k_proj\.weight \(layer 0: .*checkpoint shape",
    ):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    save_tiny_hf_model(TINY, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated"):
        load_model(str(tmp_path))


def test_folder_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="neither config.json nor a GGUF file"):
        load_model(str(tmp_path))
