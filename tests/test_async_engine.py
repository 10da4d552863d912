"""The asyncio driver: concurrent requests, streaming deltas, aborts that free blocks."""

from __future__ import annotations

import asyncio

import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.engine.async_engine import AsyncEngine, QueueFullError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(demo_gguf):
    return LLM(str(demo_gguf), kv_cache_mb=32, max_decode_steps=4)


@pytest.fixture
def driver(llm):
    d = AsyncEngine(llm.engine, max_waiting=64)
    yield d
    d.shutdown()


async def collect(driver, ids, params):
    text, tokens, reason = "", [], None
    async for update in driver.generate(ids, params):
        for u in update.updates:
            text += u.text
            tokens += u.token_ids
            reason = u.finish_reason or reason
    return text, tokens, reason


PARAMS = SamplingParams(temperature=0, max_tokens=10, stop=["\n\n"])


@pytest.fixture(scope="module")
def offline(llm):
    """Reference outputs, computed before any driver thread owns the engine."""
    prompts = [llm.tokenizer.encode(f"List {i} colors:") for i in range(6)]
    return prompts, llm.generate(prompts, PARAMS, use_tqdm=False)


def test_concurrent_streams_equal_offline_generation(offline, driver):
    prompts, offline = offline
    params = PARAMS

    async def main():
        return await asyncio.gather(*(collect(driver, p, params) for p in prompts))

    online = asyncio.run(main())
    for (text, tokens, reason), ref in zip(online, offline, strict=True):
        assert (text, reason) == (ref.text, ref.finish_reason)
        assert tokens == ref.token_ids


def test_leaving_early_aborts_and_frees_blocks(llm, driver):
    ids = llm.tokenizer.encode("Tell me a long story about dragons.")

    async def main():
        agen = driver.generate(ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            if not llm.engine.has_unfinished():
                return
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_used == 0
    assert driver.stats.finished.get("abort", 0) == 1


def test_queue_limit(llm):
    driver = AsyncEngine(llm.engine, max_waiting=0)
    try:

        async def main():
            async for _ in driver.generate([1, 2, 3], SamplingParams(max_tokens=2)):
                pass

        with pytest.raises(QueueFullError):
            asyncio.run(main())
    finally:
        driver.shutdown()
