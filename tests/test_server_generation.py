"""The generation routes' stream-dependent checks as vLLM makes them, and min_tokens under a grammar that
can only end, through the official openai client on the tiny byte-level model (fast)."""

from __future__ import annotations

import httpx
import openai
import pytest
from litestar.testing import TestClient

from server import create_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ASK = [{"role": "user", "content": "yes or no?"}]


@pytest.fixture(scope="module")
def client(structured_llm):
    with TestClient(create_app(structured_llm, served_model_name="m")) as c:
        yield c
    assert structured_llm.engine.blocks.num_used == 0


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def bodies(**fields) -> list[tuple[str, dict]]:
    base = {"max_tokens": 2, "temperature": 0, **fields}
    return [(CHAT, {"messages": ASK, **base}), (COMPLETIONS, {"prompt": "yes", **base})]


def assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_stream_options_need_stream(client):
    """vLLM: "Stream options can only be defined when stream=True"; an empty object is no option."""
    for route, body in bodies(stream_options={"include_usage": True}):
        assert_400(client.post(route, json=body), "stream_options")
        assert_400(
            client.post(route, json=body | {"stream_options": {"include_usage": False}}), "stream_options"
        )
        assert client.post(route, json=body | {"stream_options": {}}).status_code == 200
        assert client.post(route, json=body | {"stream_options": None}).status_code == 200
        assert client.post(route, json=body | {"stream": True}).status_code == 200


def test_streamed_prompt_logprobs_are_refused_as_vllm_refuses_them(client, oai):
    """vLLM refuses prompt_logprobs above 0 with stream (its chunks have no field for them) and takes 0."""
    for route, body in bodies(prompt_logprobs=1, stream=True):
        assert_400(client.post(route, json=body), "prompt_logprobs")
    chunks = oai.completions.create(
        model="m", prompt="yes", max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = oai.chat.completions.create(
        model="m", messages=ASK, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    assert [c.choices[0].finish_reason for c in chat if c.choices][-1] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_under_a_grammar_that_can_only_end(oai, stream):
    """The grammar wins: once it allows only EOS, the EOS min_tokens holds back is drawn anyway and ends
    the answer (it used to draw token 0 over and over, text outside the grammar, until min_tokens)."""
    out = oai.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=12,
        temperature=0,
        stream=stream,
        extra_body={"guided_choice": ["yes", "no"], "min_tokens": 8},
    )
    if stream:
        chunks = [c.choices[0] for c in out if c.choices]
        text, reason = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    else:
        text, reason = out.choices[0].message.content, out.choices[0].finish_reason
    assert (text, reason) in (("yes", "stop"), ("no", "stop"))
    regex = oai.completions.create(
        model="m",
        prompt="x",
        max_tokens=12,
        temperature=0,
        extra_body={"guided_regex": "a+", "min_tokens": 5},
    )
    text = regex.choices[0].text  # where the grammar may go on, min_tokens still holds EOS back
    assert set(text) == {"a"} and len(text) >= 5


def test_seed_is_a_64_bit_integer(client):
    """vLLM (and OpenAI) take seeds in int64, negative ones included; a larger one is a 400."""
    for route, body in bodies(temperature=1.0):
        assert client.post(route, json=body | {"seed": -(2**63)}).status_code == 200
        assert_400(client.post(route, json=body | {"seed": 2**63}), "seed")


def test_n_beyond_max_num_seqs_is_served(oai, structured_llm):
    """n above max_num_seqs (8 here) runs its samples in turns, as vLLM serves it (it was a 400 above 16);
    above OpenAI's 128 it is a 400."""
    out = oai.completions.create(
        model="m", prompt="yes", max_tokens=3, temperature=1.0, seed=1, n=20, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == list(range(20)) and out.usage.completion_tokens == 60
    with pytest.raises(openai.BadRequestError, match="n must be"):
        oai.completions.create(model="m", prompt="yes", max_tokens=3, n=129)


def test_choices_carry_vllms_stop_reason(client, oai):
    """vLLM's `stop_reason` in each choice: the stop string or stop token id that ended it; null otherwise."""
    free = oai.completions.create(model="m", prompt="yes", max_tokens=6, temperature=0)
    assert free.choices[0].model_extra["stop_reason"] is None
    stop = free.choices[0].text[1:3]
    cut = oai.completions.create(model="m", prompt="yes", max_tokens=6, temperature=0, stop=[stop])
    assert cut.choices[0].model_extra["stop_reason"] == stop
    streamed = oai.completions.create(
        model="m", prompt="yes", max_tokens=6, temperature=0, stop=[stop], stream=True
    )
    assert [c.choices[0].model_extra.get("stop_reason") for c in streamed if c.choices][-1] == stop
    every = list(range(structured_llm_vocab(client)))  # whatever comes first is a stop token
    chat = client.post(CHAT, json={"messages": ASK, "max_tokens": 4, "stop_token_ids": every}).json()
    assert chat["choices"][0]["stop_reason"] in every and chat["usage"]["completion_tokens"] == 1


def structured_llm_vocab(client) -> int:
    return client.app.state.ctx.llm.engine.vocab_size


def test_continuous_usage_stats_give_each_chunk_its_choices_running_usage(oai):
    """vLLM's stream_options.continuous_usage_stats (beside include_usage): every chunk carries its choice's
    usage so far; the last chunk the request's."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    kwargs = dict(model="m", max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(prompt=["yes", "no no"], stream_options=options, **kwargs))
    running = [
        (c.choices[0].index, c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.choices
    ]
    assert {(i, tokens) for i, _, tokens in running if tokens == 4} == {(0, 4), (1, 4)}
    prompt_counts = {i: {p for j, p, _ in running if j == i} for i in (0, 1)}  # each prompt's own count
    assert len(prompt_counts[0]) == len(prompt_counts[1]) == 1 and prompt_counts[0] != prompt_counts[1]
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    chat = list(oai.chat.completions.create(messages=ASK, stream_options=options, n=2, **kwargs))
    assert all(c.usage is not None for c in chat) and chat[-1].usage.completion_tokens == 8
    plain = list(
        oai.chat.completions.create(messages=ASK, stream_options={"continuous_usage_stats": True}, **kwargs)
    )
    assert all(c.usage is None for c in plain)  # only beside include_usage, as vLLM reads it


def test_a_cache_salt_isolates_the_prefix_cache(client, oai, structured_llm):
    """vLLM's `cache_salt` on both routes: the same prompt under another salt finds nothing cached (the
    engine's hit counter stands still, and the usage's `prompt_tokens_details.cached_tokens`, OpenAI's,
    says 0); under its own salt it hits. An empty salt is a 400."""
    stats = structured_llm.engine.blocks.stats
    prompt = "the same long prompt, sent under two salts to see which finds it cached. " * 2
    chat = [{"role": "user", "content": prompt}]

    def hits(route: str, salt: str, stream: bool = False) -> int:
        before = stats.hits
        extra = dict(max_tokens=1, extra_body={"cache_salt": salt})
        if stream:
            extra |= dict(stream=True, stream_options={"include_usage": True})
        if route == CHAT:
            out = oai.chat.completions.create(model="m", messages=chat, **extra)
        else:
            out = oai.completions.create(model="m", prompt=prompt, **extra)
        usage = list(out)[-1].usage if stream else out.usage
        assert usage.prompt_tokens_details.cached_tokens == stats.hits - before
        return stats.hits - before

    for route in (CHAT, COMPLETIONS):
        assert hits(route, f"{route}-a") == 0
        assert hits(route, f"{route}-b") == 0
        assert hits(route, f"{route}-a") > 0
        assert hits(route, f"{route}-b", stream=True) > 0
        assert hits(route, f"{route}-c", stream=True) == 0
    for route, body in bodies(cache_salt=""):
        assert_400(client.post(route, json=body), "cache_salt")
