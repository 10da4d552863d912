"""LoRA adapters through the server with the official openai client over a real socket: two adapters and
the base in 24 concurrent requests, each equal to its answer computed offline; adapters in /v1/models with
their parent; an unknown adapter is a 404 in OpenAI's error shape; runtime load and unload, and an
unload that waits for (or with `force` ends) a stream running with the adapter."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import openai
import pytest

from jaxrs.engine.sampling import SamplingParams
from jaxrs.llm import LLM
from server import create_app
from tests.live_server import serve
from tests.lora_models import build

PROMPTS = [" ".join(f"w{(7 * i + 5 * j) % 250 + 3}" for j in range(12 + i)) for i in range(8)]
MODELS = ["base", "alpha", "beta"]
LONG = 160  # tokens of the stream an unload waits for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base, adapters = build("llama", tmp_path_factory.mktemp("lora-server"))
    llm = LLM(
        str(base),
        lora_adapters=adapters,
        max_loras=3,
        max_lora_rank=8,
        enable_runtime_lora=True,
        kv_cache_tokens=2048,
        kv_cache_dtype="float32",
    )
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = {
        m: [o.text for o in llm.generate(PROMPTS, params, lora=None if m == "base" else m, use_tqdm=False)]
        for m in MODELS
    }
    assert want["alpha"] != want["base"] and want["beta"] != want["base"]
    long = dataclasses.replace(params, max_tokens=LONG)
    want["long"] = llm.generate(PROMPTS[0], long, lora="alpha", use_tqdm=False)[0].text
    with serve(create_app(llm, served_model_name="base")) as url:
        yield url, want, adapters, llm


def test_adapters_and_base_in_24_concurrent_requests(served):
    url, want, adapters, _ = served

    async def main():
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(model: str, i: int):
            r = await oai.completions.create(model=model, prompt=PROMPTS[i], max_tokens=6, temperature=0)
            return model, i, r.model, r.choices[0].text

        return await asyncio.gather(*(one(m, i) for i in range(8) for m in MODELS))

    results = asyncio.run(main())
    assert len(results) == 24
    for model, i, answered, text in results:
        assert answered == model and text == want[model][i], (model, i)

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in oai.models.list().data}
    assert cards["alpha"].parent == "base" and cards["beta"].root == str(adapters["beta"])
    with pytest.raises(openai.NotFoundError) as error:
        oai.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=2)
    assert error.value.body["code"] == "model_not_found" and "gamma" in error.value.body["message"]


def test_runtime_load_and_unload(served):
    url, want, adapters, _ = served
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with httpx.Client(base_url=url, timeout=60) as http:
        body = {"lora_name": "gamma", "lora_path": str(adapters["alpha"])}
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and "gamma" in r.text
        r = http.post("/v1/load_lora_adapter", json=body)  # the name is taken
        assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": "/nowhere"})
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
        text = oai.completions.create(model="gamma", prompt=PROMPTS[3], max_tokens=6, temperature=0)
        assert text.choices[0].text == want["alpha"][3]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gamma", prompt=PROMPTS[3], max_tokens=2)


def test_unload_waits_for_the_adapters_stream(served):
    """A long stream on adapter "gamma"; unloading gamma meanwhile takes its name away at once (404 for
    new requests), answers only after the stream ended intact, and leaves no KV block held. A
    `timeout: 0` unload gives up (409) and keeps the adapter; `force` ends the stream ("abort")."""
    url, want, adapters, llm = served
    llm.engine.runner.on_step = lambda call: time.sleep(0.05)  # a stream long enough to overlap

    async def stream(oai, model: str, started: asyncio.Event) -> tuple[str, str, float]:
        text, reason = [], None
        chunks = await oai.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=LONG, temperature=0, stream=True
        )
        async for chunk in chunks:
            started.set()
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(text), reason, time.monotonic()

    async def main():
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            body = {"lora_name": "gamma", "lora_path": str(adapters["alpha"])}
            assert (await http.post("/v1/load_lora_adapter", json=body)).status_code == 200
            started = asyncio.Event()
            running = asyncio.create_task(stream(oai, "gamma", started))
            await started.wait()
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma", "timeout": 0})
            assert r.status_code == 409 and "still in use" in r.json()["error"]["message"]
            assert "gamma" in [m.id for m in (await oai.models.list()).data]

            unload = asyncio.create_task(http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}))
            while "gamma" in [m.id for m in (await oai.models.list()).data]:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.NotFoundError):  # at once, while the stream still runs
                await oai.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=2)
            assert not running.done()
            r = await unload
            unloaded = time.monotonic()
            text, reason, ended = await running
            assert r.status_code == 200 and unloaded >= ended
            assert text == want["long"] and reason == "length"
            with pytest.raises(openai.NotFoundError):
                await oai.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=2)
            assert llm.engine.blocks.num_used == 0

            body = {"lora_name": "delta", "lora_path": str(adapters["beta"])}
            assert (await http.post("/v1/load_lora_adapter", json=body)).status_code == 200
            started = asyncio.Event()
            running = asyncio.create_task(stream(oai, "delta", started))
            await started.wait()
            body = {"lora_name": "delta", "timeout": 0, "force": True}
            assert (await http.post("/v1/unload_lora_adapter", json=body)).status_code == 200
            text, reason, _ = await running
            assert reason == "abort" and 0 < len(text) < len(want["long"])
            assert llm.engine.blocks.num_used == 0

    try:
        asyncio.run(main())
    finally:
        llm.engine.runner.on_step = None
