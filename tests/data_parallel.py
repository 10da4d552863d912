"""Two data-parallel replicas of a tiny model on a simulated 2-device CPU mesh behind one server: 32
concurrent completions, whose tokens and routing come back as JSON on stdout.

Run as its own process with the device count set before JAX starts (`test_parallel_data.py` does):
`XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.data_parallel MODEL_DIR`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from litestar.testing import AsyncTestClient

from jaxrs import LLM, SamplingParams
from server import create_app
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config

PROMPTS = [[3 + (7 * i + j) % 250 for j in range(4 + i % 9)] for i in range(32)]
MAX_TOKENS = 4
ENGINE = dict(
    kv_cache_tokens=1024,
    kv_cache_dtype="float32",
    block_size=8,
    max_model_len=64,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_decode_steps=2,
)


async def serve_all(app) -> tuple[list[str], list[int]]:
    """Every prompt as one greedy /v1/completions request, all at once; the texts, and how many
    requests each replica took."""
    async with AsyncTestClient(app, timeout=600) as client:

        async def one(prompt: list[int]) -> str:
            body = {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            reply = await client.post("/v1/completions", json=body | {"ignore_eos": True})
            reply.raise_for_status()
            return reply.json()["choices"][0]["text"]

        texts = await asyncio.gather(*(one(p) for p in PROMPTS))
        return list(texts), list(app.state.ctx.driver.routed)


def main(folder: Path) -> int:
    if not folder.exists():
        folder.mkdir(parents=True)
        save_tiny_hf_model(tiny_llama_config(), folder, seed=5)
        save_tiny_tokenizer(folder, 256)
    llm = LLM(str(folder), dtype="float32", data_parallel_size=2, **ENGINE)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = [out.text for out in llm.generate(PROMPTS, greedy, use_tqdm=False)]  # replica 0 only
    app = create_app(llm, served_model_name="m")
    served, routed = asyncio.run(serve_all(app))
    devices = [str(next(iter(e.runner.kv.k.devices()))) for e in llm.replicas]
    print(json.dumps({"alone": alone, "served": served, "routed": routed, "devices": devices}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
