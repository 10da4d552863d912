"""The OpenAI-compatible server, driven by the official openai client (sync and async) in-process and
over a real uvicorn socket, with the demo model: answers, streams, usage, errors, auth, load, aborts."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from litestar.testing import AsyncTestClient, TestClient
from prometheus_client.parser import text_string_to_metric_families

from jaxrs import LLM, SamplingParams
from jaxrs.engine.warmup import Warmup
from server import create_app
from tests.live_server import serve
from tests.test_compiled_steps import FakeStep, call, compiled_with

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(demo_gguf):
    return LLM(str(demo_gguf), kv_cache_mb=64, max_num_seqs=16, max_model_len=1024, max_decode_steps=4)


@pytest.fixture(scope="module")
def reference(llm):
    """The greedy answer computed offline, before any app's engine thread owns the engine."""
    return llm.chat(CAPITAL, SamplingParams(**GREEDY), use_tqdm=False)[0]


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm)


@pytest.fixture
def client(app, llm):
    """The app started (its lifespan runs the engine thread) for one test; the engine ends clean."""
    with TestClient(app) as c:
        yield c
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_used == 0


@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def name_of(app) -> str:
    return app.state.ctx.served_name


def metric_total(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def await_metric(url: str, name: str, expected: float, **labels: str) -> float:
    """The metric once it reaches `expected` (the engine thread counts a finish just after sending it)."""
    deadline = time.monotonic() + 5
    while (value := metric_total(httpx.get(f"{url}/metrics").text, name, **labels)) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return value


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body, checking every line is a data line or blank."""
    lines = body.splitlines()
    assert all(line.startswith("data: ") or not line for line in lines), body
    return [line.removeprefix("data: ") for line in lines if line]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# -- the openai client, in-process ------------------------------------------------------------------


def test_chat_answers_with_the_offline_text_and_exact_usage(oai, app, llm, reference):
    resp = oai.chat.completions.create(model=name_of(app), messages=CAPITAL, **GREEDY)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.created > 0
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.content == reference.text and choice.finish_reason == reference.finish_reason
    assert choice.message.role == "assistant"
    assert resp.usage.prompt_tokens == len(llm.chat_prompt_ids(CAPITAL)) == len(reference.prompt_token_ids)
    assert resp.usage.completion_tokens == len(reference.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_is_well_formed(oai, client, app, reference):
    chunks = list(
        oai.chat.completions.create(
            model=name_of(app),
            messages=CAPITAL,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reference.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference.token_ids)

    # On the wire: text/event-stream, `data:` lines only, [DONE] last; no usage chunk unless asked.
    body = {"messages": CAPITAL, "stream": True, **GREEDY}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == reference.finish_reason
    assert all("usage" not in p for p in payloads)


@pytest.fixture(scope="module")
def prompt_scores(llm):
    """A prompt's token log-probabilities scored offline, before an app's engine thread owns the engine."""
    ids = llm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    return ids, llm.score([ids[:1]], [ids[1:]])[0]


def test_completions_echo_with_logprobs_scores_the_prompt(prompt_scores, oai, app, llm):
    """`echo` with `logprobs` (what evaluation harnesses send): the prompt's tokens come back with their
    log-probabilities (the first has none) and the likeliest tokens at each, then the answer's."""
    ids, scores = prompt_scores
    text = llm.tokenizer.decode(ids)
    resp = oai.completions.create(
        model=name_of(app), prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=3
    )
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text.startswith(text) and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(scores, abs=1e-4)
    for top, own in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True):
        assert 1 <= len(top) <= 4 and own in top.values() and max(top.values()) >= own - 1e-5
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = oai.completions.create(
        model=name_of(app), prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=3, stream=True
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert chunks[0].text == text and chunks[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]
    alone = oai.completions.create(model=name_of(app), prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = alone.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and alone.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(scores, abs=1e-4)


def test_completions_prompt_logprobs_are_vllms(prompt_scores, oai, app, llm):
    """vLLM's prompt_logprobs (in extra_body): None for the first token, then {token id: {logprob, rank,
    decoded_token}} holding the prompt token (its exact rank) and the N likeliest."""
    ids, scores = prompt_scores
    resp = oai.completions.create(
        model=name_of(app), prompt=ids, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = resp.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, score, entry in zip(ids[1:], scores, entries[1:], strict=True):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(score, abs=1e-4) and own["rank"] >= 1
        assert own["decoded_token"] == llm.tokenizer.decode([token])
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert 2 <= len(entry) <= 3 and [e["rank"] for e in ranked][:2] == [1, 2]
        assert (own["rank"] <= 2) == (len(entry) == 2)


def test_vllm_sampling_extras_are_served(oai, app, client, llm):
    """min_tokens holds EOS back (forced early by logit_bias), truncate_prompt_tokens feeds the last
    tokens (usage counts them), allowed_token_ids limits the output; bad values are 400s naming them."""
    eos = min(llm.engine._eos)
    forced = dict(model=name_of(app), max_tokens=8, temperature=0, logit_bias={str(eos): 100})
    held = oai.chat.completions.create(messages=CAPITAL, **forced, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens >= 4 and held.choices[0].finish_reason == "stop"
    free = oai.chat.completions.create(messages=CAPITAL, **forced)
    assert free.usage.completion_tokens <= 1
    cut = oai.completions.create(
        model=name_of(app),
        prompt="one two three four five six",
        max_tokens=1,
        extra_body={"truncate_prompt_tokens": 2},
    )
    assert cut.usage.prompt_tokens == 2
    allowed = llm.tokenizer.encode(" Paris Rome", add_special_tokens=False)
    only = oai.completions.create(
        model=name_of(app),
        prompt="The capital",
        max_tokens=4,
        temperature=0,
        logprobs=0,
        extra_body={"allowed_token_ids": allowed},
    )
    assert set(only.choices[0].logprobs.tokens) <= {llm.tokenizer.decode([t]) for t in allowed}
    for field, value in (
        ("min_tokens", 99),
        ("min_tokens", -1),
        ("truncate_prompt_tokens", 0),
        ("allowed_token_ids", [10**9]),
        ("prompt_logprobs", 99),
    ):
        body = {"prompt": "hi", "max_tokens": 8, field: value}
        assert_error(client.post("/v1/completions", json=body), 400, field)
    scored = oai.chat.completions.create(messages=CAPITAL, **forced, extra_body={"prompt_logprobs": 1})
    entries = scored.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == scored.usage.prompt_tokens
    assert all(1 <= len(e) <= 2 and min(v["rank"] for v in e.values()) == 1 for e in entries[1:])
    body = {"messages": CAPITAL, "prompt_logprobs": 1, "stream": True}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "prompt_logprobs")


def test_completions_text_token_ids_lists_echo_and_n(oai, app, llm):
    prompt = "The capital of France is"
    resp = oai.completions.create(model=name_of(app), prompt=prompt, max_tokens=4, temperature=0)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode(prompt)) and resp.usage.completion_tokens == 4
    text = resp.choices[0].text

    ids = llm.tokenizer.encode(prompt)
    by_ids = oai.completions.create(model=name_of(app), prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text

    many = oai.completions.create(
        model=name_of(app), prompt=[prompt, "1, 2, 3,"], n=2, max_tokens=4, temperature=0, echo=True
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == prompt + text
    assert many.choices[2].text.startswith("1, 2, 3,")
    assert many.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode("1, 2, 3,"))
    assert many.usage.completion_tokens == 16

    stream = oai.completions.create(
        model=name_of(app), prompt=[ids, ids], max_tokens=4, temperature=0, stream=True
    )
    texts = ["", ""]
    finishes = [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [text, text] and finishes == ["length", "length"]


def test_logprobs(oai, app, llm):
    resp = oai.chat.completions.create(
        model=name_of(app), messages=CAPITAL, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token

    prompt = "The capital of France is"
    legacy = oai.completions.create(
        model=name_of(app), prompt=prompt, max_tokens=4, temperature=0, logprobs=3
    ).choices[0]
    lp = legacy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == legacy.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(
        len(top) <= 3 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )


def test_n_stop_and_seed(oai, app):
    name = name_of(app)
    stopped = oai.chat.completions.create(model=name, messages=CAPITAL, stop=["Paris"], **GREEDY)
    assert "Paris" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    kept = oai.chat.completions.create(
        model=name,
        messages=CAPITAL,
        stop=["Paris"],
        extra_body={"include_stop_str_in_output": True},
        **GREEDY,
    )
    assert kept.choices[0].message.content == stopped.choices[0].message.content + "Paris"

    sampled = dict(model=name, messages=CAPITAL, temperature=1.0, max_tokens=8)
    two = oai.chat.completions.create(n=2, seed=3, **sampled)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in two.choices)
    assert two.usage.completion_tokens <= 16

    first = oai.chat.completions.create(seed=11, **sampled).choices[0].message.content
    again = oai.chat.completions.create(seed=11, **sampled).choices[0].message.content
    assert first == again


def test_a_prefilled_answer_is_continued(oai, app, reference):
    """vLLM's `continue_final_message`: the final assistant message is left open and the model goes on
    from it (the greedy answer, less the prefill), rather than starting a new turn."""
    prefill = [*CAPITAL, {"role": "assistant", "content": "The capital of France"}]
    options = {"continue_final_message": True, "add_generation_prompt": False}
    resp = oai.chat.completions.create(model=name_of(app), messages=prefill, extra_body=options, **GREEDY)
    assert "The capital of France" + resp.choices[0].message.content == reference.text


def test_models(oai, app):
    names = [m.id for m in oai.models.list().data]
    assert names[0] == name_of(app) == "SmolLM2-135M-Instruct.Q4_1"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in names
    assert [oai.models.retrieve(name).id for name in names] == names  # the path alias too
    # Any alias is accepted as the request's model; the response names the served model.
    resp = oai.chat.completions.create(model=names[1], messages=CAPITAL, temperature=0, max_tokens=1)
    assert resp.model == names[0]


def test_async_client_in_process(app, reference):
    """AsyncOpenAI over Litestar's AsyncTestClient (which serves one request at a time; concurrency is
    tested over a real socket below)."""

    async def main():
        async with AsyncTestClient(app) as client:
            oai = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
            )

            async def one() -> str:
                stream = await oai.chat.completions.create(
                    model=name_of(app), messages=CAPITAL, stream=True, **GREEDY
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            plain = await oai.chat.completions.create(model=name_of(app), messages=CAPITAL, **GREEDY)
            streamed = await asyncio.gather(*(one() for _ in range(2)))
            return plain.choices[0].message.content, streamed

    plain, streamed = asyncio.run(main())
    assert plain == reference.text and streamed == [reference.text] * 2


# -- errors ------------------------------------------------------------------------------------------


def test_error_shapes_and_statuses(client, oai, app, llm):
    name = name_of(app)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.post("/v1/chat/completions", content=b'{"messages": ['), 400)
    assert_error(client.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
    assert_error(
        client.post("/v1/chat/completions", json={"messages": CAPITAL, "temperature": "warm"}),
        400,
        "temperature",
    )
    assert_error(client.post("/v1/completions", json={"prompt": "x", "top_p": 2}), 400, "top_p")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "n": 0}), 400, "n")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"-1": 5}}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": [10**7]}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": [[1], "x"]}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    error = assert_error(
        client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CAPITAL}), 404, "model"
    )
    assert "gpt-4o" in error["message"] and error["code"] == "model_not_found"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error = assert_error(
        client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
        ),
        400,
    )
    assert "image" in error["message"]
    assert_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]}), 400
    )
    # Too long: prompt + max_tokens beyond max_model_len, with the numbers.
    prompt_len = len(llm.tokenizer.encode("hello"))
    error = assert_error(
        client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1024}), 400, "max_tokens"
    )
    assert "1024" in error["message"] and str(prompt_len + 1024) in error["message"]
    assert_error(client.post("/v1/completions", json={"prompt": "hi " * 1100, "max_tokens": 1}), 400)
    # Over the body limit (4 MiB by default).
    assert_error(client.post("/v1/completions", content=b" " * (4 * 2**20 + 1)), 413)
    # The openai client maps them to its exceptions.
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=name, messages=CAPITAL, top_p=3.0)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")
    # Unknown fields are ignored; text parts are joined; the server still answers normally.
    resp = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": CAPITAL[0]["content"]}]}],
            "some_future_field": {"x": 1},
            **GREEDY,
        },
    )
    assert resp.status_code == 200 and "Paris" in resp.json()["choices"][0]["message"]["content"]


def test_engine_failure_is_a_500_or_an_error_event(app, llm, monkeypatch):
    from jaxrs.errors import JaxrsError

    async def failing(prompt_ids, params, *, request_id=None, cache_key=None):
        raise JaxrsError("the engine failed: boom")
        yield  # an async generator, like AsyncEngine.generate

    with TestClient(app) as client:
        monkeypatch.setattr(app.state.ctx.driver, "generate", failing)
        error = assert_error(client.post("/v1/chat/completions", json={"messages": CAPITAL}), 500)
        assert error["type"] == "server_error" and "boom" in error["message"]
        r = client.post("/v1/chat/completions", json={"messages": CAPITAL, "stream": True})
        assert r.status_code == 200  # the headers were out before the failure
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and "boom" in json.loads(events[-2])["error"]["message"]


def test_queue_full_is_429(llm):
    with TestClient(create_app(llm, max_waiting=0)) as client:
        error = assert_error(client.post("/v1/chat/completions", json={"messages": CAPITAL}), 429)
        assert error["type"] == "rate_limit_error"


def test_auth_and_health_before_ready(llm):
    app = create_app(llm, api_key="sekret")
    idle = TestClient(app)  # not entered: the lifespan (engine thread) has not started
    assert_error(idle.get("/health"), 503)
    assert_error(idle.get("/v1/models"), 401)
    assert_error(idle.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert idle.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert_error(
        idle.post(
            "/v1/chat/completions", headers={"Authorization": "Bearer sekret"}, json={"messages": CAPITAL}
        ),
        503,
    )
    assert idle.get("/metrics").status_code == 200
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        good = openai.OpenAI(base_url="http://testserver/v1", api_key="sekret", http_client=client)
        resp = good.chat.completions.create(model=name_of(app), messages=CAPITAL, temperature=0, max_tokens=2)
        assert resp.usage.completion_tokens == 2
        bad = openai.OpenAI(
            base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_health_is_ok_while_the_background_compiles(llm):
    """Ready once the engine runs: /health is 200 and says how many shapes are left; requests are
    answered meanwhile; `compiling` goes once the warm-up is complete."""
    gate = threading.Event()
    step = FakeStep(gate, held=lambda rows: rows > 1)  # the background's compiles wait for the gate
    warmup = Warmup(compiled_with(step), [call(rows) for rows in (1, 2, 4)], first=1)
    warmup.run(background=True)
    for _ in range(2):  # row 1 compiled, row 2 compiling in the background, row 4 waiting
        assert step.started.acquire(timeout=10)
    llm.engine.runner.warming = warmup
    try:
        with TestClient(create_app(llm)) as client:
            assert client.get("/health").json() == {"status": "ok", "compiling": 1}
            assert metric_total(client.get("/metrics").text, "step_shapes_pending") == 1
            answer = client.post("/v1/chat/completions", json={"messages": CAPITAL, **GREEDY})
            assert answer.status_code == 200
            gate.set()
            assert warmup.wait(10)
            assert client.get("/health").json() == {"status": "ok"}
    finally:
        llm.engine.runner.warming = None
        gate.set()


# -- load, disconnects, metrics, the request log -------------------------------------------------


@pytest.fixture
def live(llm, tmp_path):
    """The app behind a real uvicorn socket on 127.0.0.1 (a free port), in a thread."""
    log_path = tmp_path / "requests.jsonl"
    app = create_app(llm, request_log=log_path)
    with serve(app) as url:
        yield url, app, log_path


def test_64_concurrent_streams_and_metrics(live, llm):
    """Over the socket, since Litestar's AsyncTestClient runs one request at a time."""
    url, _, _ = live

    async def stream(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8, "stream": True}
        if i % 16 == 5:
            body["top_p"] = 7  # a few bad requests among the good ones
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        return r.status_code, r.text

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            before = (await client.get(f"{url}/metrics")).text
            results = await asyncio.gather(*(stream(client, i) for i in range(68)))
            after = (await client.get(f"{url}/metrics")).text
        return before, results, after

    start = time.perf_counter()
    before, results, after = asyncio.run(main())
    elapsed = time.perf_counter() - start
    good = [(s, t) for i, (s, t) in enumerate(results) if i % 16 != 5]
    assert len(good) == 64 and all(s == 200 for s, _ in good)
    assert all(s == 400 for i, (s, _) in enumerate(results) if i % 16 == 5)
    for _, text in good:
        events = sse_events(text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert llm.engine.blocks.num_used == 0 and not llm.engine.has_unfinished()
    done_before = metric_total(before, "sequences_completed_total")
    assert await_metric(url, "sequences_completed_total", done_before + 64) == done_before + 64
    assert metric_total(after, "http_requests_total", route="/v1/chat/completions", status="200") == 64
    assert metric_total(after, "http_requests_total", route="/v1/chat/completions", status="400") == 4
    assert metric_total(after, "time_to_first_token_seconds_count") == 64
    assert metric_total(after, "kv_cache_blocks_used") == 0
    assert metric_total(after, "kv_cache_blocks_total") == llm.engine.blocks.num_blocks
    assert metric_total(after, "tokens_processed_total", kind="generation") > 0
    print(f"64 streams in {elapsed:.1f} s")


def test_real_server_with_openai_client(live, reference):
    url, app, _ = live
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    resp = oai.chat.completions.create(model=name_of(app), messages=CAPITAL, **GREEDY)
    assert "Paris" in resp.choices[0].message.content
    stream = oai.chat.completions.create(model=name_of(app), messages=CAPITAL, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference.text
    completion = oai.completions.create(model=name_of(app), prompt="Hello", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3
    assert httpx.get(f"{url}/health").status_code == 200

    async def concurrent_streams() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def one() -> str:
            stream = await client.chat.completions.create(
                model=name_of(app), messages=CAPITAL, stream=True, **GREEDY
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one() for _ in range(8)))
        finally:
            await client.close()

    assert asyncio.run(concurrent_streams()) == [reference.text] * 8


def wait_until_idle(llm, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while llm.engine.has_unfinished() or llm.engine.blocks.num_used:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)


def test_disconnect_aborts_and_frees_blocks(live, llm):
    url, app, log_path = live
    body = {"messages": CAPITAL, "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [next(lines) for _ in range(6)]  # the role chunk and some content
        assert any('"content"' in line for line in received)
        wait_until_idle(llm)  # the connection is gone: the request is dropped, its blocks freed
    assert await_metric(url, "sequences_completed_total", 1, reason="abort") == 1

    # A client that gives up on a whole (non-streamed) response aborts it too.
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=1.5) as http:
        http.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", **body})
    wait_until_idle(llm)

    deadline = time.monotonic() + 5
    while len(log_path.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    streamed, whole = (json.loads(line) for line in log_path.read_text().splitlines())
    assert streamed["finish_reasons"] == ["abort"] and streamed["stream"] is True
    assert 0 < streamed["completion_tokens"] < 900
    assert whole["finish_reasons"] == ["abort"] and whole["status"] == 499
    assert await_metric(url, "sequences_completed_total", 2, reason="abort") == 2


def test_request_log(llm, tmp_path):
    for full_text in (False, True):
        path = tmp_path / f"log-{full_text}.jsonl"
        with TestClient(create_app(llm, request_log=path, log_full_text=full_text)) as client:
            ok = client.post("/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 3})
            bad = client.post("/v1/completions", json={"prompt": "x", "temperature": -1})
            streamed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
        assert (ok.status_code, bad.status_code, streamed.status_code) == (200, 400, 200)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [x["route"] for x in lines] == ["/v1/chat/completions", "/v1/completions", "/v1/completions"]
        first, second, third = lines
        assert first["id"] == ok.json()["id"] and first["status"] == 200 and first["model"]
        assert first["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
        assert first["completion_tokens"] == 3 and first["finish_reasons"] == ["length"]
        assert first["latency_s"] > 0 and first["time"] > 0
        assert second["status"] == 400 and "temperature" in second["error"]
        assert third["stream"] is True and third["completion_tokens"] == 2
        if full_text:
            assert first["prompt"] == CAPITAL and first["response"] == [
                ok.json()["choices"][0]["message"]["content"]
            ]
        else:
            assert "prompt" not in first and "response" not in first


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_serve_builds_the_app_and_runs_uvicorn(monkeypatch, llm, tmp_path):
    from jaxrs import cli

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    loaded, served = {}, {}
    monkeypatch.setattr("jaxrs.llm.LLM", lambda model, **kw: loaded.update(model=model, **kw) or llm)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("JAXRS_API_KEY", "from-env")
    argv = ["serve", "--no-warmup", "--port", "9001", "--served-model-name", "smol", "--max-num-seqs", "4"]
    argv += ["--chat-template", str(template), "--max-body-mb", "1", "--log", str(tmp_path / "log.jsonl")]
    assert cli.main(argv) == 0
    assert loaded["model"] is None and loaded["max_num_seqs"] == 4
    assert served["host"] == "127.0.0.1" and served["port"] == 9001
    app = served["app"]
    ctx = app.state.ctx
    assert ctx.served_name == "smol" and ctx.chat_tokenizer.chat_template == template.read_text()
    assert llm.tokenizer.chat_template != template.read_text()  # the model's own is untouched
    idle = TestClient(app)
    assert_error(idle.get("/v1/models"), 401)
    assert (
        idle.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()["data"][0]["id"] == "smol"
    )
    with TestClient(app) as client:  # the override is what prompts are rendered with
        headers = {"Authorization": "Bearer from-env"}
        r = client.post("/v1/chat/completions", headers=headers, json={"messages": CAPITAL, "max_tokens": 1})
        rendered = llm.tokenizer.encode(CAPITAL[0]["content"] + "\n", add_special_tokens=False)
        assert r.json()["usage"]["prompt_tokens"] == len(rendered)
    assert cli.main(["serve", "--chat-template", str(tmp_path / "missing.jinja")]) == 1


def test_conversation_keeps_text_parts_apart_for_typed_templates():
    """Several text parts reach a template that reads typed parts one by one (as transformers hands
    them over), and a template of strings as one newline-joined text."""
    from jaxrs.vision.chat import template_contents
    from server.routes_chat import conversation
    from server.schemas import ChatMessage, ContentPart

    parts = [ContentPart("text", text="w5"), ContentPart("text", text="w6")]
    messages, images = conversation([ChatMessage("user", parts)])
    assert images == [] and messages[0]["content"] == [
        {"type": "text", "text": "w5"},
        {"type": "text", "text": "w6"},
    ]

    class Typed:
        chat_template = (
            "{% for m in messages %}{% for c in m['content'] %}[{{ c['text'] }}]{% endfor %}{% endfor %}"
        )

        def apply_chat_template(self, messages, add_generation_prompt=False):
            import jinja2

            return jinja2.Template(self.chat_template).render(messages=messages)

    typed = Typed()
    assert typed.apply_chat_template(template_contents(typed, messages, None)) == "[w5][w6]"
    typed.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert template_contents(typed, messages, None)[0]["content"] == "w5\nw6"
