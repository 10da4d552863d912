"""Decoder models as embedders against transformers (a sentence-transformers Llama folder with mean
pooling, a generation Qwen2 with last-token pooling, a bidirectional Gemma 3 with sliding layers), and
what every embedder checks: empty, too many and too long inputs, ids outside the vocabulary, truncation,
Matryoshka dimensions, batches that pad differently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, Gemma3TextConfig, LlamaConfig, Qwen2Config

from jaxrs import LLM
from jaxrs.config import FULL, SLIDING
from jaxrs.embedding import MAX_INPUTS, Embedder, EmbeddingInputError, length_bucket
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.embedding_models import reference_pool, write_sentence_transformers

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
HEADS = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def texts(seed: int, count: int, longest: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(f"w{w}" for w in rng.integers(3, 128, rng.integers(1, longest + 1))) for _ in range(count)
    ]


def reference(path, ids: list[list[int]], mode: str, normalize: bool) -> np.ndarray:
    """transformers' base model (final norm applied) on each input alone, pooled."""
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        vec = reference_pool(hidden, torch.ones_like(x), mode)
        out.append(torch.nn.functional.normalize(vec, dim=-1) if normalize else vec)
    return torch.cat(out).numpy()


def save_decoder(path, config, *, pooling: str | None, **st) -> None:
    save_tiny_hf_model(config, path)
    save_tiny_tokenizer(path, config.vocab_size)
    if pooling is not None:
        write_sentence_transformers(path, (pooling,), **st)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A sentence-transformers Llama folder: mean pooling, normalized, 24 tokens at most, Matryoshka."""
    path = tmp_path_factory.mktemp("llama-embed")
    save_decoder(path, LlamaConfig(**SMALL, **HEADS), pooling="mean", normalize=True, max_seq_length=24)
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"matryoshka_dimensions": [16, 32, 64]})
    )
    return path, LLM(str(path), dtype="float32")


def test_llama_mean_pooling_matches_transformers(llama):
    path, llm = llama
    assert not llm.generates
    batch = texts(0, 12, 22)
    ours = llm.embed(batch)
    ids = llm.embedder.token_ids(batch)
    np.testing.assert_allclose(ours, reference(path, ids, "mean", True), atol=2e-5, rtol=1e-4)
    # padding to another batch shape changes nothing
    np.testing.assert_allclose(llm.embed(batch[:3]), ours[:3], atol=1e-6)


def test_qwen2_generation_model_embeds_its_last_token(tmp_path):
    save_decoder(tmp_path, Qwen2Config(**SMALL, **HEADS, tie_word_embeddings=True), pooling=None)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_mb=4, max_num_seqs=2)
    assert llm.generates
    batch = texts(1, 6, 30)
    ours = llm.embed(batch)
    ids = llm.embedder.token_ids(batch)
    np.testing.assert_allclose(ours, reference(tmp_path, ids, "lasttoken", True), atol=2e-5, rtol=1e-4)
    with pytest.raises(EmbeddingInputError, match="Matryoshka"):
        llm.embed(batch, dimensions=16)


def test_bidirectional_gemma3_with_sliding_layers_matches_transformers(tmp_path):
    """EmbeddingGemma's shape: every token sees the whole input (the sliding layers a window either
    side: transformers turns the file's window 8 into distances < 5)."""
    config = Gemma3TextConfig(
        **SMALL,
        **HEADS | {"num_hidden_layers": 3},
        head_dim=32,
        layer_types=[SLIDING, FULL, SLIDING],
        sliding_window=8,
        use_bidirectional_attention=True,
    )
    save_decoder(tmp_path, config, pooling="mean", normalize=False)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == 8
    llm = LLM(str(tmp_path), dtype="float32")
    batch = texts(2, 5, 20) + ["w5 " * 20]
    ids = llm.embedder.token_ids(batch)
    assert max(map(len, ids)) > 10  # past the window
    ours = llm.embed(batch)
    np.testing.assert_allclose(ours, reference(tmp_path, ids, "mean", False), atol=3e-5, rtol=1e-4)
    e = llm.embedder
    causal = Embedder(e.cfg, e.params, e.tokenizer, e.spec, source=e.source).embed_ids(ids)
    assert np.abs(causal - ours).max() > 1e-2  # the mask matters here


def test_matryoshka_dimensions_truncate_and_renormalize(llama):
    _, llm = llama
    full = llm.embed(["w5 w6 w7", "w9"])
    short = llm.embed(["w5 w6 w7", "w9"], dimensions=32)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    for bad in (20, 0, 65):
        with pytest.raises(EmbeddingInputError, match="dimensions must be one of 16, 32, 64"):
            llm.embed(["w5"], dimensions=bad)


def test_too_long_inputs_are_refused_unless_truncation_is_asked_for(llama):
    _, llm = llama
    long = " ".join(["w7"] * 30)
    with pytest.raises(EmbeddingInputError, match=r"input\[1\] has 30 tokens, more than the 24"):
        llm.embed(["w5", long])
    cut = llm.embed([long, list(range(3, 40))], truncate_prompt_tokens=10)
    np.testing.assert_allclose(cut, llm.embed([" ".join(["w7"] * 10), list(range(3, 13))]), atol=1e-6)
    np.testing.assert_allclose(llm.embed(long, truncate_prompt_tokens=-1), llm.embed(" ".join(["w7"] * 24)))
    with pytest.raises(EmbeddingInputError, match="truncate_prompt_tokens must be -1 or in"):
        llm.embed(["w5"], truncate_prompt_tokens=25)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "input must not be empty"),
        (["w5", ""], r"input\[1\] is an empty string"),
        ([[3, 4], []], r"input\[1\] is an empty list"),
        ([[3, 128]], r"input\[0\]: token ids must be in \[0, 128\)"),
        ([[-1]], r"token ids must be in"),
        (["w5"] * (MAX_INPUTS + 1), f"at most {MAX_INPUTS} inputs"),
    ],
)
def test_bad_inputs_name_the_problem(llama, inputs, message):
    _, llm = llama
    with pytest.raises(EmbeddingInputError, match=message):
        llm.embed(inputs)


def test_length_buckets():
    assert [length_bucket(n) for n in (1, 16, 17, 25, 33, 49, 64, 65, 97, 129, 200)] == [
        16, 16, 24, 32, 48, 64, 64, 96, 128, 192, 256,
    ]  # fmt: skip


def test_concurrent_calls_are_merged_and_each_gets_its_own_vectors(llama):
    import threading

    _, llm = llama
    batches = [texts(10 + i, 1 + i % 3, 20) for i in range(8)]
    alone = [llm.embed(b) for b in batches]
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: llm.embed(batches[i])})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_allclose(got[i], alone[i], atol=1e-6)
