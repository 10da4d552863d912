"""The batch-invariant mode through the engine, on the real demo loaded as users load it (packed): a seeded
sampled request gives the same tokens alone and among other rows (batches of several sizes, greedy and
other seeds beside it), plainly and under prompt-lookup speculation; and what the mode refuses."""

from __future__ import annotations

import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.config import ModelConfig
from jaxrs.engine.batch_invariance import KERNELS, invariant_kernels
from jaxrs.engine.options import EngineConfig
from jaxrs.errors import JaxrsError
from jaxrs.lora.config import LoraConfig
from jaxrs.ops import Kernels

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)
WORDS = "the cat sat on a warm mat while rain fell softly over the quiet old town and children ran".split()
PROMPTS = [" ".join(WORDS[: 3 + i]) for i in range(16)]


def beside(n: int) -> list[SamplingParams]:
    """n - 1 rows to run beside the seeded one: greedy and sampled with other seeds, other lengths."""
    return [
        SamplingParams(temperature=0, max_tokens=6 + i % 5, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=1.1, max_tokens=12, seed=i, ignore_eos=True)
        for i in range(n - 1)
    ]


def seeded_alone_and_beside(llm: LLM, sizes: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
    """The seeded request's tokens alone, then in a batch of each size (its place in the batch varies)."""
    target = PROMPTS[5]
    alone = llm.generate([target], SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    found = []
    for n in sizes:
        prompts, params = PROMPTS[6 : 6 + n - 1], beside(n)
        at = n // 2
        prompts.insert(at, target)
        params.insert(at, SEEDED)
        found.append(llm.generate(prompts, params, use_tqdm=False)[at].outputs[0].token_ids)
    engine = llm.engine
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return alone, found


@pytest.mark.slow
def test_a_seeded_request_draws_the_same_alone_and_in_batches(demo_gguf):
    llm = LLM(str(demo_gguf), kv_cache_mb=48, batch_invariant=True)
    alone, batched = seeded_alone_and_beside(llm, (2, 5, 9))
    assert batched == [alone] * 3


@pytest.mark.slow
def test_and_under_prompt_lookup_speculation(demo_gguf):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    llm = LLM(str(demo_gguf), kv_cache_mb=48, batch_invariant=True, speculative_config=spec)
    alone, batched = seeded_alone_and_beside(llm, (5,))
    assert batched == [alone]
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0


def test_the_mode_chooses_its_kernels():
    kernels = invariant_kernels(EngineConfig(), Kernels.from_mapping({"lora": "xla"}), platform="cpu")
    assert dict(kernels.choice) == {"lora": "xla", **KERNELS}


@pytest.mark.parametrize(
    ("config", "kernels", "platform", "message"),
    [
        (EngineConfig(), {}, "gpu", "runs on CPU .* on gpu"),
        (EngineConfig(lora=LoraConfig(runtime=True)), {}, "cpu", "LoRA"),
        (EngineConfig(), {"qmatmul": "xla"}, "cpu", "'qmatmul' kernel 'invariant'; 'xla' was chosen"),
        (EngineConfig(), {"paged_attention": "pallas"}, "cpu", "'paged_attention' kernel"),
    ],
    ids=["gpu", "lora", "qmatmul", "attention"],
)
def test_what_would_undo_it_is_refused(config, kernels, platform, message):
    with pytest.raises(JaxrsError, match=message):
        invariant_kernels(config, Kernels.from_mapping(kernels), platform=platform)


def test_mixture_of_experts_is_refused():
    cfg = ModelConfig("mixtral", 64, 32, 64, 1, 4, 2, 8, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(JaxrsError, match=r"mixture-of-experts models \(mixtral\)"):
        invariant_kernels(EngineConfig(), Kernels(), cfg, platform="cpu")


def test_the_flag_reaches_the_engine_config():
    from jaxrs.cli import build_parser, engine_kwargs

    parse = build_parser().parse_args
    assert engine_kwargs(parse(["serve", "--batch-invariant"]))["batch_invariant"] is True
    assert engine_kwargs(parse(["run"]))["batch_invariant"] is False
