"""Re-quantizing a live engine (runtime ISQ) on a tiny random Llama: requests in flight carry on and
finish, the new weights are exactly a fresh ISQ load's, the prefix cache starts empty, a failed load
puts the old weights back, and the server's POST /v1/re_isq (and /re_isq) does it while streams run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest
import uvicorn
from litestar.testing import TestClient

from jaxrs import LLM, SamplingParams
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.requantize import RequantizeError
from jaxrs.errors import JaxrsError
from jaxrs.llm import request_output
from jaxrs.quant.tensor import tree_nbytes
from server import create_app
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config

TINY = tiny_llama_config()
# Blocks of 8 and one decode token per call keep prompts (and their recomputation) in one 16-token
# prefill bucket and decode in one shape: few compilations, so the tests stay fast.
CONFIG = EngineConfig(block_size=8, kv_cache_mb=4, max_num_seqs=8, max_model_len=512, max_decode_steps=1)
KNOBS = dict(dtype="float32", **dataclasses.asdict(CONFIG))
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[3 + (7 * i + 5 * j) % 250 for j in range(3 + 3 * i)] for i in range(4)]  # 3..12 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-re-isq")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return str(folder)


@pytest.fixture(scope="module")
def fresh(tiny):
    """A fresh load at the type the tests re-quantize to (sharing its compiled steps with them)."""
    return LLM(tiny, isq="Q4K", **KNOBS)


def generate(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def start(engine: Engine, prompts, steps: int) -> list:
    """Queue the prompts and run `steps` engine steps; the requests are then part way through."""
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(steps):
        engine.step()
    assert all(0 < len(r.seqs[0].output_ids) < GREEDY.max_tokens for r in requests)
    return requests


def finish(engine: Engine, requests) -> list[list[int]]:
    while engine.has_unfinished():
        engine.step()
    outputs = [request_output(r, None) for r in requests]
    assert all(o.finish_reason == "length" and len(o.token_ids) == GREEDY.max_tokens for o in outputs)
    assert engine.blocks.num_used == 0
    return [o.token_ids for o in outputs]


def same_tree(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


# -- the engine ---------------------------------------------------------------------------------------


def test_requests_in_flight_finish_on_weights_equal_to_a_fresh_isq_load(tiny, fresh):
    llm = LLM(tiny, **KNOBS)
    engine = llm.engine
    cached = [[t + 1 for t in p] for p in PROMPTS]  # the last two fill a block, cached before the swap
    generate(llm, cached)
    assert [o.num_cached_tokens for o in llm.generate(cached, GREEDY, use_tqdm=False)] == [0, 0, 8, 8]
    requests = start(engine, PROMPTS, steps=2)
    before = [list(r.seqs[0].output_ids) for r in requests]
    blocks, float_bytes = engine.blocks.num_blocks, tree_nbytes(llm.model.params)

    done = llm.requantize("q4k")

    assert (done.ggml_type, done.requeued, done.cut) == ("Q4_K", len(PROMPTS), [])
    assert done.weight_bytes_before == float_bytes > done.weight_bytes_after
    # memory: exactly the weights a fresh load with isq=Q4K holds, and the same KV pool (fixed MiB)
    assert same_tree(llm.model.params, fresh.model.params)
    assert done.weight_bytes_after == tree_nbytes(llm.model.params) == tree_nbytes(fresh.model.params)
    assert done.kv_blocks_after == engine.blocks.num_blocks == blocks == fresh.engine.blocks.num_blocks
    assert llm.model is engine.model and llm.model.tokenizer is llm.tokenizer
    # in flight: recomputed with the new weights, they go on as a fresh Q4K engine does from there
    after = finish(engine, requests)
    assert [a[: len(b)] for a, b in zip(after, before, strict=True)] == before
    rest = [SamplingParams(temperature=0, max_tokens=16 - len(b), ignore_eos=True) for b in before]
    resumed = generate(fresh, [p + b for p, b in zip(PROMPTS, before, strict=True)], rest)
    assert [a[len(b) :] for a, b in zip(after, before, strict=True)] == resumed
    # new requests: exactly a fresh Q4K load's tokens; the old weights' cached blocks are gone
    assert generate(llm, PROMPTS) == generate(fresh, PROMPTS)
    assert [o.num_cached_tokens for o in llm.generate(cached, GREEDY, use_tqdm=False)] == [0] * 4


def test_forked_samples_waiting_on_shared_blocks_recompute(tiny, fresh):
    """n = 3: after the prompt step the other two samples wait holding the prompt's blocks; they are
    released too, and come out as on a fresh load."""
    llm = LLM(tiny, **KNOBS)
    params = SamplingParams(temperature=0, n=3, max_tokens=16, ignore_eos=True)
    request = llm.engine.add_request(PROMPTS[3], params)
    llm.engine.step()
    assert len(llm.engine.scheduler.waiting) == 2 and all(s.table.blocks for s in request.seqs[1:])
    llm.requantize("Q4K")
    while llm.engine.has_unfinished():
        llm.engine.step()
    samples = [o.token_ids for o in request_output(request, None).outputs]
    assert [len(t) for t in samples] == [16] * 3 and llm.engine.blocks.num_used == 0
    alone = fresh.generate([PROMPTS[3]], params, use_tqdm=False)[0]
    assert samples[1:] == [o.token_ids for o in alone.outputs[1:]]


def test_a_failed_load_puts_the_old_weights_back(tiny):
    llm = LLM(tiny, **KNOBS)
    expected = generate(llm, PROMPTS)
    original = jax.device_get(llm.model.params)

    def unreadable(fmt: str):
        raise OSError(f"cannot read the weights for {fmt}")

    engine = Engine(llm.model, CONFIG, reload=unreadable)
    requests = start(engine, PROMPTS, steps=2)
    with pytest.raises(RequantizeError, match="cannot read the weights for Q4_K"):
        engine.requantize("Q4K")
    assert same_tree(engine.model.params, original)
    assert finish(engine, requests) == expected  # recomputed with the restored weights: same tokens


def test_unknown_type_touches_nothing(tiny):
    llm = LLM(tiny, **KNOBS)
    params, runner, blocks = llm.model.params, llm.engine.runner, llm.engine.blocks
    requests = start(llm.engine, PROMPTS[:2], steps=2)
    held = blocks.num_used
    with pytest.raises(JaxrsError, match="Q4_K"):
        llm.requantize("Q9_Z")
    assert llm.model.params is params and llm.engine.runner is runner and llm.engine.blocks is blocks
    assert blocks.num_used == held and len(llm.engine.scheduler.running) == 2
    finish(llm.engine, requests)


def test_a_smaller_pool_cuts_what_it_cannot_hold(tiny, monkeypatch):
    """On an accelerator the pool is sized from the memory left; if it shrinks below a sequence, that
    sequence ends ("length") with what it has, and the others carry on."""
    llm = LLM(tiny, **KNOBS)
    long, short = list(range(3, 17)), PROMPTS[0]  # 14 and 3 tokens, 16 and 5 after two steps
    requests = start(llm.engine, [long, short], steps=2)
    monkeypatch.setattr("jaxrs.engine.engine.kv_pool_bytes", lambda config, per_token: 16 * per_token)
    done = llm.requantize("Q8_0")
    assert (done.kv_blocks_after, done.max_model_len) == (2, 16)
    assert done.cut == [requests[0].seqs[0]] and requests[0].finished
    assert requests[0].seqs[0].finish_reason == "length" and not requests[1].finished
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert requests[1].seqs[0].finish_reason == "length" and len(requests[1].seqs[0].output_ids) == 16 - 3


# -- the server ---------------------------------------------------------------------------------------


@pytest.fixture
def live(tiny):
    """An app over a real socket (Litestar's in-process clients serve one request at a time)."""
    llm = LLM(tiny, **KNOBS)
    app = create_app(llm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", llm
    server.should_exit = True
    thread.join(timeout=30)


STREAMED = 96  # tokens per stream: long enough to be mid-way when the re-ISQ lands


def test_re_isq_while_streams_run(live, fresh):
    url, llm = live
    expected = [o.text for o in fresh.generate(PROMPTS, GREEDY, use_tqdm=False)]

    async def stream(client: httpx.AsyncClient, prompt: list[int], started: asyncio.Event) -> dict:
        body = {
            "prompt": prompt,
            "max_tokens": STREAMED,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    events.append(line.removeprefix("data: "))
                    started.set()
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        return {"reason": reasons[-1], "tokens": chunks[-1]["usage"]["completion_tokens"]}

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            started = [asyncio.Event() for _ in PROMPTS]
            streams = [
                asyncio.create_task(stream(client, p, e)) for p, e in zip(PROMPTS, started, strict=True)
            ]
            await asyncio.gather(*(e.wait() for e in started))
            swap = await client.post(f"{url}/v1/re_isq", json={"ggml_type": "Q4K"})
            results = await asyncio.gather(*streams)
            after = await client.post(
                f"{url}/v1/completions",
                json={"prompt": PROMPTS, "max_tokens": 16, "temperature": 0, "ignore_eos": True},
            )
            metrics = (await client.get(f"{url}/metrics")).text
            return swap, results, after, metrics

    swap, results, after, metrics = asyncio.run(main())
    assert swap.status_code == 200, swap.text
    summary = swap.json()
    assert summary["ggml_type"] == "Q4_K" and summary["requeued"] == len(PROMPTS) and summary["cut"] == 0
    assert summary["weight_bytes_after"] == tree_nbytes(fresh.model.params) == tree_nbytes(llm.model.params)
    assert summary["kv_blocks_after"] == summary["kv_blocks_before"] == fresh.engine.blocks.num_blocks
    assert results == [{"reason": "length", "tokens": STREAMED}] * len(PROMPTS)
    assert [c["text"] for c in after.json()["choices"]] == expected
    assert "re_isq_total 1.0" in metrics
    assert llm.engine.blocks.num_used == 0 and not llm.engine.has_unfinished()


def test_route_alias_auth_and_bad_bodies(tiny):
    llm = LLM(tiny, **KNOBS)
    params = llm.model.params
    expected = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].text
    key = {"Authorization": "Bearer k"}
    completion = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(llm, api_key="k")) as client:
        assert client.post("/re_isq", json={"ggml_type": "Q8_0"}).status_code == 401
        assert client.post("/v1/re_isq", json={"ggml_type": "Q8_0"}).status_code == 401
        messages = {}
        for name, body, param in (
            ("unknown type", {"ggml_type": "Q9_Z"}, "ggml_type"),
            ("missing field", {}, None),
            ("wrong type", {"ggml_type": 4}, "ggml_type"),
            ("unknown field", {"ggml_type": "Q8_0", "group_size": 64}, None),
        ):
            r = client.post("/v1/re_isq", json=body, headers=key)
            assert r.status_code == 400, (name, r.text)
            error = r.json()["error"]
            assert (
                set(error) == {"message", "type", "param", "code"}
                and error["type"] == "invalid_request_error"
            )
            assert param is None or error["param"] == param, (name, error)
            messages[name] = error["message"]
        assert all(f in messages["unknown type"] for f in ("Q9_Z", "Q4_K", "Q8_0", "HQQ4"))
        assert "ggml_type" in messages["missing field"]
        assert llm.model.params is params  # untouched, and serving as before
        assert (
            client.post("/v1/completions", json=completion, headers=key).json()["choices"][0]["text"]
            == expected
        )
        r = client.post("/re_isq", json={"ggml_type": "8"}, headers=key)
        assert r.status_code == 200 and r.json()["ggml_type"] == "Q8_0"
    assert llm.model.params is not params


def test_reloading_keeps_how_the_embeddings_were_loaded(monkeypatch):
    """A runtime re-ISQ reads the source again with the load's `isq_embeddings` choice, not the default."""
    import jax.numpy as jnp

    from jaxrs.engine import requantize

    seen = {}
    monkeypatch.setattr(requantize, "load_model", lambda source, **kw: seen.update(kw, source=source))
    requantize.source_reloader("model.gguf", jnp.float32, isq_embeddings="float")("Q4_0")
    assert seen == {
        "source": "model.gguf",
        "dtype": jnp.float32,
        "tokenizer": None,
        "isq": "Q4_0",
        "isq_embeddings": "float",
    }
