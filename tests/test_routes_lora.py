"""LoRA adapters through the server with the official openai client over a real socket: two adapters and
the base in 24 concurrent requests, each equal to its answer computed offline; adapters in /v1/models with
their parent; an unknown adapter is a 404 in OpenAI's error shape; runtime load and unload."""

from __future__ import annotations

import asyncio

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
    with serve(create_app(llm, served_model_name="base")) as url:
        yield url, want, adapters


def test_adapters_and_base_in_24_concurrent_requests(served):
    url, want, adapters = served

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
    url, want, adapters = served
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
