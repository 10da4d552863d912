"""BERT-family encoders as sentence embedders against transformers: tiny random BERT and RoBERTa folders
written offline (every pooling mode), and the real all-MiniLM-L6-v2 from the package registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxrs import LLM
from jaxrs.errors import ModelLoadError
from jaxrs.loading.sentence_transformers import load_encoder
from tests.embedding_models import (
    WORDS,
    cosines,
    random_sentences,
    reference_pool,
    save_wordpiece_tokenizer,
    write_sentence_transformers,
)

VOCAB = 4 + WORDS


def save_tiny_encoder(path, kind: str = "bert"):
    """A random 2-layer BERT (or RoBERTa) saved as BertModel saves it; returns the torch model."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    config_cls, model_cls = (BertConfig, BertModel) if kind == "bert" else (RobertaConfig, RobertaModel)
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=80,
        pad_token_id=0 if kind == "bert" else 1,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = model_cls(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    save_wordpiece_tokenizer(path, VOCAB)
    return model


def reference(model, ids: list[list[int]], modes: tuple[str, ...], normalize: bool) -> np.ndarray:
    """The torch model on each input alone, pooled per sentence-transformers."""
    out = []
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        vec = torch.cat([reference_pool(hidden, torch.ones_like(x), m) for m in modes], dim=-1)
        out.append(torch.nn.functional.normalize(vec, dim=-1) if normalize else vec)
    return torch.cat(out).numpy()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    model = save_tiny_encoder(path)
    return path, model


def test_tiny_bert_matches_transformers_with_every_pooling_mode(tiny_bert):
    """All four modes on at once: sentence-transformers concatenates them (cls, max, mean, lasttoken)."""
    path, model = tiny_bert
    modes = ("cls", "max", "mean", "lasttoken")
    write_sentence_transformers(path, modes, normalize=False)
    llm = LLM(str(path), dtype="float32")
    texts = random_sentences(np.random.default_rng(1), 24, 40)
    ours = llm.embed(texts)
    ids = llm.embedder.token_ids(texts)
    assert all(row[0] == 2 and row[-1] == 3 for row in ids)  # [CLS] ... [SEP], the padding off
    assert max(map(len, ids)) > 32 and len({len(r) for r in ids}) > 5  # several length buckets
    ref = reference(model, ids, modes, normalize=False)
    assert ours.shape == (24, 64 * len(modes))
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(llm.embed(texts[3]), ours[3], atol=1e-6)  # alone = in a batch


def test_tiny_roberta_numbers_positions_after_the_padding_id(tmp_path):
    model = save_tiny_encoder(tmp_path, "roberta")
    write_sentence_transformers(tmp_path, ("mean",), normalize=False)
    llm = LLM(str(tmp_path), dtype="float32")
    texts = random_sentences(np.random.default_rng(2), 6, 30)
    ids = llm.embedder.token_ids(texts)
    np.testing.assert_allclose(
        llm.embed(texts), reference(model, ids, ("mean",), False), atol=2e-5, rtol=1e-4
    )


def test_a_plain_encoder_folder_pools_like_sentence_transformers_would(tiny_bert, tmp_path):
    """No modules.json: mean pooling, not normalized."""
    path, model = tiny_bert
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    llm = LLM(str(tmp_path), dtype="float32")
    texts = ["w4 w5 w6", "w7"]
    ref = reference(model, llm.embedder.token_ids(texts), ("mean",), False)
    np.testing.assert_allclose(llm.embed(texts), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(Exception, match="embedding model"):
        llm.generate("w4")


def test_dense_modules_after_pooling_match_torch(tiny_bert, tmp_path):
    """Pooling -> Dense (tanh, bias) -> Dense (identity, no bias) -> Normalize, as EmbeddingGemma's
    folder chains them; a bad Dense config is a load error naming the file."""
    from safetensors.numpy import save_file

    path, model = tiny_bert
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    write_sentence_transformers(tmp_path, ("mean",), normalize=False)
    rng = np.random.default_rng(3)
    layers = [(64, 32, True, "Tanh"), (32, 16, False, "Identity")]
    modules = json.loads((tmp_path / "modules.json").read_text())
    weights = []
    for i, (fan_in, fan_out, bias, act) in enumerate(layers):
        folder = tmp_path / f"{i + 2}_Dense"
        folder.mkdir()
        config = {"in_features": fan_in, "out_features": fan_out, "bias": bias}
        (folder / "config.json").write_text(
            json.dumps(config | {"activation_function": f"torch.nn.modules.activation.{act}"})
        )
        w = {"linear.weight": rng.normal(0, 0.3, (fan_out, fan_in)).astype(np.float32)}
        if bias:
            w["linear.bias"] = rng.normal(0, 0.3, fan_out).astype(np.float32)
        save_file(w, str(folder / "model.safetensors"))
        weights.append(w)
        modules.append({"idx": i + 2, "path": folder.name, "type": "sentence_transformers.models.Dense"})
    modules.append({"idx": 4, "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    llm = LLM(str(tmp_path), dtype="float32")
    texts = random_sentences(np.random.default_rng(4), 5, 30)
    ref = reference(model, llm.embedder.token_ids(texts), ("mean",), False)
    ref = np.tanh(ref @ weights[0]["linear.weight"].T + weights[0]["linear.bias"])
    ref = ref @ weights[1]["linear.weight"].T
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    ours = llm.embed(texts)
    assert ours.shape == (5, 16)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)
    (tmp_path / "3_Dense" / "config.json").write_text(
        json.dumps({"in_features": 32, "out_features": 16, "activation_function": "torch.nn.Softplus"})
    )
    with pytest.raises(ModelLoadError, match=r"3_Dense.*Softplus"):
        LLM(str(tmp_path), dtype="float32")


def test_an_encoder_option_we_do_not_run_is_a_load_error(tiny_bert, tmp_path):
    path, _ = tiny_bert
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"position_embedding_type": "relative_key"}))
    with pytest.raises(ModelLoadError, match="position_embedding_type 'relative_key'"):
        load_encoder(tmp_path, np.float32)


# -- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome!",
    "The cat sits outside.",
    "The new movie is so great",
    "I love pasta.",
    "Do you like pizza?",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "¿Dónde está la biblioteca?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "https://example.com/path?query=embedding&lang=en",
    "Error 404: the requested resource could not be found on this server.",
    "ok",
    "?",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "She sells seashells by the seashore.",
    "Please remember to bring your umbrella; the forecast says heavy rain after noon.",
    "Quantum entanglement links the states of particles regardless of the distance between them.",
    "My flight was delayed by three hours because of a mechanical problem.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "He scored the winning goal in the final minute of extra time.",
    "Can you recommend a good book about the history of mathematics?",
    "The committee will review all applications submitted before the deadline.",
    "Emojis like 😀 and 🚀 appear more and more in informal writing.",
    "UPPERCASE TEXT SHOULD LOWERCASE THE SAME WAY",
    "numbers: 3.14159, 2.71828, 1.41421 and 1,000,000",
    "The court ruled that the contract was void because one party had been misled about its terms.",
    "Glaciers are retreating faster than at any time in recorded history.",
    "A cheap laptop with a long battery life is what most students need.",
    "Breaking: heavy snowfall closes schools across the region.",
    "The orchestra tuned their instruments before the concert began.",
    "Machine learning models can reflect the biases present in their training data.",
    "Il pleut depuis ce matin et il fait froid.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The defendant pleaded not guilty to all charges.",
    " ".join(["A very long sentence about embeddings and retrieval"] * 12),
    "She opened the window to let the fresh spring air into the room.",
    "Tokenization splits text into subword units before the model sees it.",
]


@pytest.fixture(scope="module")
def minilm():
    from jaxrs.loading.embedding_models import fetch_minilm

    path = fetch_minilm(quiet=True)
    return path, LLM(str(path), dtype="float32")


@pytest.mark.slow
def test_minilm_matches_transformers_plus_its_pooling_config(minilm):
    from transformers import AutoModel, AutoTokenizer

    path, llm = minilm
    assert len(SENTENCES) == 50
    ours = llm.embed(SENTENCES)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert llm.embedder.token_ids(SENTENCES) == [
        row[mask.bool()].tolist()
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    ref = torch.nn.functional.normalize(
        reference_pool(hidden, batch["attention_mask"], "mean"), dim=-1
    ).numpy()
    assert ours.shape == (50, 384)
    assert cosines(ours, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_known_similarity(minilm):
    _, llm = minilm
    a, b, c = llm.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome!"]
    )
    assert float(a @ b) == pytest.approx(0.755, abs=0.005)
    assert float(a @ c) < 0.2
