"""vLLM's /tokenize and /detokenize, and /v1/models' cards, on the tiny byte-level model: a prompt's ids
are those /v1/completions feeds, messages' those /v1/chat/completions feeds (usage counts them), ids
decode back, and bad input is a 400 naming the field."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

from server import create_app

ASK = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def client(structured_llm):
    with TestClient(create_app(structured_llm, served_model_name="m")) as c:
        yield c


def test_tokenize_gives_the_ids_the_generation_routes_feed(client, structured_llm):
    tokenizer = structured_llm.tokenizer
    r = client.post("/tokenize", json={"prompt": "hello there", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode("hello there") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == structured_llm.engine.max_model_len
    assert body["token_strs"] == [tokenizer.id_to_token(t) for t in body["tokens"]]
    chat = client.post("/tokenize", json={"model": "m", "messages": ASK}).json()
    usage = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"] and chat["token_strs"] is None
    back = client.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "hello there"}
    for route, bad, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": ASK}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ]:
        r = client.post(route, json=bad)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, (route, bad, r.text)


def test_model_cards_name_the_source_and_context(client, structured_llm):
    cards = client.get("/v1/models").json()["data"]
    assert cards[0]["id"] == "m" and cards[0]["object"] == "model"
    assert cards[0]["root"] == structured_llm.source
    assert cards[0]["max_model_len"] == structured_llm.engine.max_model_len
    assert client.get("/v1/models/m").json() == cards[0]
