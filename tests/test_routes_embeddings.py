"""POST /v1/embeddings through the official openai client and raw HTTP: the real all-MiniLM-L6-v2 (single,
batch, token ids, base64, usage, every bad input as an OpenAI 400), Matryoshka dimensions on a tiny
model, and a generation model that embeds only when asked to."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import openai
import pytest
from litestar.testing import TestClient
from transformers import Qwen2Config

from jaxrs import LLM
from jaxrs.embedding import MAX_INPUTS
from server import create_app
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.test_bert import save_tiny_encoder
from tests.test_server import assert_error

pytestmark = pytest.mark.slow

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome!"]


def client_for(llm: LLM, **options):
    app = create_app(llm, **options)
    with TestClient(app) as http:
        oai = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )
        yield app.state.ctx.served_name, oai, http


@pytest.fixture(scope="module")
def minilm():
    from jaxrs.loading.embedding_models import fetch_minilm

    return LLM(str(fetch_minilm(quiet=True)), dtype="float32")


@pytest.fixture(scope="module")
def served(minilm):
    yield from client_for(minilm)


def test_single_and_batch_match_llm_embed(served, minilm):
    name, oai, _ = served
    expected = minilm.embed(SENTENCES)
    one = oai.embeddings.create(model=name, input=SENTENCES[0], encoding_format="float")
    assert one.object == "list" and one.model == name and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)
    assert one.usage.prompt_tokens == one.usage.total_tokens == 8  # [CLS] 6 words . [SEP]
    batch = oai.embeddings.create(model=name, input=SENTENCES)  # the client asks for base64 by default
    assert [d.index for d in batch.data] == [0, 1, 2]
    np.testing.assert_allclose([d.embedding for d in batch.data], expected, atol=1e-6)
    assert batch.usage.prompt_tokens == sum(len(ids) for ids in minilm.embedder.token_ids(SENTENCES))
    a, b = (np.array(d.embedding) for d in batch.data[:2])
    assert float(a @ b) == pytest.approx(0.755, abs=0.005)


def test_base64_is_little_endian_float32(served, minilm):
    name, _, http = served
    body = {"model": name, "input": SENTENCES[:2], "encoding_format": "base64"}
    data = http.post("/v1/embeddings", json=body).json()["data"]
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
    np.testing.assert_array_equal(vectors, minilm.embed(SENTENCES[:2]))


def test_token_id_inputs(served, minilm):
    name, oai, _ = served
    ids = minilm.embedder.token_ids(SENTENCES[:2])
    one = oai.embeddings.create(model=name, input=ids[0], encoding_format="float")
    many = oai.embeddings.create(model=name, input=ids, encoding_format="float")
    expected = minilm.embed(SENTENCES[:2])
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)
    np.testing.assert_allclose([d.embedding for d in many.data], expected, atol=1e-6)
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_truncation_only_when_asked(served, minilm):
    name, _, http = served
    long = "word " * 300
    error = assert_error(http.post("/v1/embeddings", json={"input": long}), 400, "input")
    assert "more than the 256" in error["message"] and "truncate_prompt_tokens" in error["message"]
    done = http.post("/v1/embeddings", json={"input": long, "truncate_prompt_tokens": 16}).json()
    assert done["usage"]["prompt_tokens"] == 16
    cut = minilm.embed(long, truncate_prompt_tokens=16)
    np.testing.assert_allclose(done["data"][0]["embedding"], cut, atol=1e-6)


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"input": []}, "input", "must not be empty"),
        ({"input": ""}, "input", "empty string"),
        ({"input": ["ok", ""]}, "input", r"input\[1\] is an empty string"),
        ({"input": [[101, 102], []]}, "input", "empty list of token ids"),
        ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"at most {MAX_INPUTS}"),
        ({"input": 5}, "input", "Expected"),
        ({"input": {"text": "a"}}, "input", "Expected"),
        ({"input": ["a", 7]}, "input", "not a mix"),
        ({"input": [101, 30522]}, "input", r"token ids must be in \[0, 30522\)"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64', not 'int8'"),
        ({"input": "a", "dimensions": 128}, "dimensions", "Matryoshka"),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1 or in"),
    ],
)
def test_bad_requests_are_openai_400s(served, body, param, message):
    _, _, http = served
    error = assert_error(http.post("/v1/embeddings", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]


def test_an_unknown_model_is_a_404(served):
    _, _, http = served
    error = assert_error(http.post("/v1/embeddings", json={"input": "a", "model": "gpt-4"}), 404, "model")
    assert "not served here" in error["message"]


def test_the_client_raises_bad_request(served):
    name, oai, _ = served
    with pytest.raises(openai.BadRequestError, match="empty string"):
        oai.embeddings.create(model=name, input="")


def test_an_embedding_model_refuses_generation_and_lists_itself(served):
    name, oai, http = served
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 400, "model")
    assert name in [m.id for m in oai.models.list().data]
    assert http.get("/health").status_code == 200


def test_matryoshka_dimensions(tmp_path):
    save_tiny_encoder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"matryoshka_dimensions": [16, 32, 64]}))
    llm = LLM(str(tmp_path), dtype="float32")
    for name, oai, _ in client_for(llm):
        full = llm.embed(["w5 w6"])[0]
        short = oai.embeddings.create(model=name, input="w5 w6", dimensions=32).data[0].embedding
        np.testing.assert_allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="dimensions must be one of 16, 32, 64"):
            oai.embeddings.create(model=name, input="w5", dimensions=20)


def test_a_generation_model_embeds_when_enabled(tmp_path):
    save_tiny_hf_model(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2), tmp_path)  # fmt: skip
    save_tiny_tokenizer(tmp_path, 128)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_mb=4, max_num_seqs=2, max_model_len=64)
    for name, oai, _ in client_for(llm):
        with pytest.raises(openai.BadRequestError, match="--enable-embeddings"):
            oai.embeddings.create(model=name, input="w5 w6")
    for name, oai, _ in client_for(llm, enable_embeddings=True):
        got = oai.embeddings.create(model=name, input=["w5 w6", "w7"], encoding_format="float")
        np.testing.assert_allclose([d.embedding for d in got.data], llm.embed(["w5 w6", "w7"]), atol=1e-6)
