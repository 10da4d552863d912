"""Speculative decoding through the engine on tiny random Llamas: greedy output token for token equal to
plain decoding (a different draft, the target itself, prompt lookup; with prefix caching and
preemption), seeded sampling batch-invariant, mixed batches with processors, no leaked blocks, and a
draft of another vocabulary refused."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import LlamaConfig

from jaxrs import LLM, SamplingParams
from jaxrs.engine.speculative_config import SpeculativeConfig
from jaxrs.errors import JaxrsError
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

VOCAB = 128
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
SMALL_POOL = 64  # KV tokens: 4 blocks for 4 sequences growing to 2 blocks each: preemptions
ENGINE = dict(kv_cache_dtype="float32", kv_cache_tokens=1024, max_num_seqs=4, max_model_len=128)


def tiny(folder, layers: int, seed: int, vocab: int = VOCAB) -> str:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder.mkdir()
    save_tiny_hf_model(config, folder, seed=seed)
    save_tiny_tokenizer(folder, vocab)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {"target": tiny(root / "target", 2, 0), "draft": tiny(root / "draft", 1, 1)}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    # Mixed lengths within one padded prefill length (fewer shapes to compile), and a repeating prompt,
    # where prompt lookup finds its drafts.
    mixed = [rng.integers(3, VOCAB, size=n).tolist() for n in (3, 7, 12)]
    return mixed + [rng.integers(3, VOCAB, size=4).tolist() * 4]


@pytest.fixture(scope="module")
def plain(models, prompts):
    llm = LLM(models["target"], **ENGINE)
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def generate(llm: LLM, prompts, params) -> list[list[int]]:
    out = [o.token_ids for o in llm.generate(prompts, params)]
    engine = llm.engine
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    return out


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"model": "draft", "num_speculative_tokens": 3}, marks=pytest.mark.slow),
        pytest.param({"model": "target", "num_speculative_tokens": 4, "isq": "Q4_0"}, marks=pytest.mark.slow),
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
    ],
    ids=["other-draft", "isq-copy", "ngram"],
)
def test_greedy_equals_plain_decoding(models, prompts, plain, spec):
    spec = {**spec, "model": models[spec["model"]]} if "model" in spec else spec
    llm = LLM(models["target"], speculative_config=spec, **ENGINE)
    speculator = llm.engine.speculator
    rows = llm.engine.runner.buckets()[1]  # 1, 2, 3 and 4 rows on CPU; 1, 2 and 4 elsewhere
    if speculator.draft is None:  # warm-up compiles every verify shape: serving compiles none
        assert speculator.warmup([GREEDY]) == len(speculator.verifying) == len(rows)
    assert generate(llm, prompts, GREEDY) == plain
    if speculator.draft is None:
        assert len(speculator.verifying) == len(rows)
    stats = llm.engine.stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_accepted_tokens
    if "isq" in spec or spec.get("method") == "ngram":  # these drafts are sometimes right
        assert stats.num_accepted_tokens > 0


def test_the_target_as_its_own_draft_is_always_accepted(models, prompts, plain):
    spec = {"model": models["target"], "num_speculative_tokens": 4}
    llm = LLM(models["target"], speculative_config=spec, **ENGINE)
    assert generate(llm, prompts, GREEDY) == plain
    stats = llm.engine.stats().spec_decode
    assert stats.acceptance_rate == 1.0 and stats.accepted_per_position == [stats.num_drafts] * 4


@pytest.mark.slow
def test_preemption_and_prefix_caching_keep_the_output_and_the_draft_cache(models, prompts, plain):
    """Preempted sequences recompute both pools; sequences that had no blocks to speculate catch their
    draft cache up: the target as its own draft is still always right."""
    spec = {"model": models["target"], "num_speculative_tokens": 4}
    llm = LLM(models["target"], speculative_config=spec, **{**ENGINE, "kv_cache_tokens": SMALL_POOL})
    assert generate(llm, prompts, GREEDY) == plain
    assert generate(llm, prompts, GREEDY) == plain
    snapshot = llm.engine.stats()
    assert snapshot.num_preemptions > 0 and snapshot.spec_decode.acceptance_rate == 1.0


def test_seeded_prompt_lookup_is_batch_invariant(models, prompts):
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(models["target"], speculative_config=spec, batch_invariant=True, **ENGINE)
    params = [
        SamplingParams(seed=i, temperature=0.8, top_p=0.95, max_tokens=12, ignore_eos=True) for i in (1, 2)
    ]
    together = generate(llm, prompts[2:], params)
    assert together == [generate(llm, [p], [sp])[0] for p, sp in zip(prompts[2:], params, strict=True)]
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0


@pytest.mark.slow
def test_seeded_sampling_and_processors(models, prompts):
    """Same seed, same tokens alone and in a batch; rows with penalties, bias, top-k/min-p, logprobs and
    speculation switched off ride in one batch (the batch-invariant mode: the draft's products too)."""
    spec = {"model": models["draft"], "num_speculative_tokens": 3}
    llm = LLM(models["target"], speculative_config=spec, batch_invariant=True, **ENGINE)
    base = dict(max_tokens=12, ignore_eos=True, temperature=0.9)
    params = [
        SamplingParams(seed=1, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5, **base),
        SamplingParams(seed=3, logit_bias={5: 4.0}, top_k=20, min_p=0.05, logprobs=2, **base),
        SamplingParams(seed=4, speculative=False, **base),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.0),
    ]
    together = generate(llm, prompts, params)
    alone = [generate(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert together == alone
    assert generate(llm, prompts, params) == together
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    out = llm.generate([prompts[1]], params[1])[0].outputs[0]
    assert len(out.logprobs) == 12 and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in out.logprobs)


def test_aborts_and_preemptions_leave_no_blocks(models, prompts):
    spec = {"method": "ngram", "num_speculative_tokens": 4}
    llm = LLM(models["target"], speculative_config=spec, **{**ENGINE, "kv_cache_tokens": SMALL_POOL})
    engine = llm.engine
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(4):
        engine.step()
    engine.abort(requests[0].request_id)
    engine.abort(requests[3].request_id)
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats().num_preemptions > 0


def test_a_draft_of_another_vocabulary_is_refused(models, tmp_path):
    other = tiny(tmp_path / "other", 1, 2, vocab=96)
    with pytest.raises(JaxrsError, match=r"vocabulary \(96 tokens.*\(128 tokens"):
        LLM(models["target"], speculative_config={"model": other, "num_speculative_tokens": 2}, **ENGINE)
    with pytest.raises(JaxrsError, match="num_speculative_tokens"):
        LLM(models["target"], speculative_config={"method": "ngram"}, **ENGINE)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).method == "ngram"


@pytest.mark.slow
def test_greedy_equals_transformers_assisted_generation(models, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(models["target"], dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(models["draft"], dtype=torch.float32).eval()
    spec = {"model": models["draft"], "num_speculative_tokens": 3}
    llm = LLM(models["target"], speculative_config=spec, **ENGINE)
    ours = generate(llm, prompts, GREEDY)
    for prompt, tokens in zip(prompts, ours, strict=True):
        out = target.generate(
            torch.tensor([prompt]),
            assistant_model=draft,
            do_sample=False,
            max_new_tokens=GREEDY.max_tokens,
            min_new_tokens=GREEDY.max_tokens,
            pad_token_id=0,
        )
        assert out[0, len(prompt) :].tolist() == tokens


@pytest.mark.slow
def test_demo_model_with_its_isq_copy_as_draft(demo_gguf):
    """The real demo model (f32 cache) with a Q4_0 ISQ copy of itself as its draft: the same greedy
    tokens as plain decoding, and a draft that is often right."""
    engine = dict(kv_cache_dtype="float32", kv_cache_mb=32, max_num_seqs=4, max_model_len=256)
    plain = LLM(str(demo_gguf), **engine)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ids = [plain.tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = generate(plain, ids, params)
    spec = {"model": str(demo_gguf), "isq": "Q4_0", "num_speculative_tokens": 4}
    llm = LLM(str(demo_gguf), speculative_config=spec, **engine)
    assert generate(llm, ids, params) == expected
    stats = llm.engine.stats().spec_decode  # measured: 50% of draft tokens, 74% of first drafts kept
    assert stats.acceptance_rate > 0.3 and stats.accepted_per_position[0] > 0.6 * stats.num_drafts


def test_counters_and_their_prometheus_names():
    from prometheus_client import CollectorRegistry, generate_latest

    from jaxrs.engine.speculative import SpecDecodeStats
    from server.metrics import _spec_decode_metrics

    stats = SpecDecodeStats(accepted_per_position=[0, 0, 0])
    stats.count([3, 3, 0, 2], [3, 1, 0, 0])  # a row without proposals is no draft
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 8, 4)
    assert stats.accepted_per_position == [2, 1, 1]
    assert stats.acceptance_rate == 0.5 and stats.mean_accepted_length == 1 + 4 / 3

    class Collector:
        def collect(self):
            return _spec_decode_metrics(stats)

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert "spec_decode_num_drafts_total 3.0" in text
    assert "spec_decode_num_draft_tokens_total 8.0" in text
    assert "spec_decode_num_accepted_tokens_total 4.0" in text
    assert 'spec_decode_num_accepted_tokens_per_pos_total{position="0"} 2.0' in text


@pytest.mark.slow
def test_min_tokens_holds_eos_back_in_drafts_and_verification(models, prompts):
    """The ban follows each verified position's token index: EOS, forced by logit_bias, comes exactly at
    token min_tokens with speculation as without."""
    eos = 2  # the tiny tokenizer's
    params = SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100.0}, min_tokens=5)
    plain = generate(LLM(models["target"], **ENGINE), prompts[3:], params)[0]
    spec = {"model": models["target"], "num_speculative_tokens": 3}
    llm = LLM(models["target"], speculative_config=spec, **ENGINE)
    assert generate(llm, prompts[3:], params)[0] == plain
    assert plain[5:] == [eos] and eos not in plain[:5]
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
