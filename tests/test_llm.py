"""The Python API end to end on the real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

from __future__ import annotations

import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.errors import JaxrsError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(demo_gguf):
    return LLM(str(demo_gguf), kv_cache_mb=64)


def test_chat_answers_coherently(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its answer with <|im_end|>
    assert out.token_ids[-1] == 2 and out.text == llm.tokenizer.decode(
        out.token_ids[:-1], skip_special_tokens=True
    )


def test_chat_takes_text_content_parts(llm):
    """OpenAI's content parts on a text-only model render as the joined text (a template that expects
    a string failed on the list)."""
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    asked = llm.chat([{"role": "user", "content": parts}], SamplingParams(temperature=0, max_tokens=1))
    joined = llm.chat_prompt_ids([{"role": "user", "content": "What is the capital\nof France?"}])
    assert asked[0].prompt_token_ids == joined


def test_a_prefilled_answer_is_continued(llm):
    asked = [{"role": "user", "content": "What is the capital of France?"}]
    whole = llm.chat(asked, GREEDY)[0].text
    prefill = [*asked, {"role": "assistant", "content": "The capital of France"}]
    rest = llm.chat(prefill, GREEDY, add_generation_prompt=False, continue_final_message=True)[0].text
    assert "The capital of France" + rest == whole


def test_batched_prompts_equal_alone(llm):
    """Each prompt's greedy tokens in a batch are its tokens alone, up to a near tie: a batch of 4 rows takes
    bfloat16 GEMMs (README, "Defaults") where one row takes f32 GEMVs, so the two may part where two tokens'
    log-probabilities lie within `near_tie` of each other, each side's choice then the other's runner-up (the
    demo's "The three primary colors are" at its 9th token: 0.013 apart alone, 0.003 in the batch)."""
    near_tie = 0.05
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    prompts = [
        "The quick brown fox",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "The three primary colors are",
    ]
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, together, strict=True):
        alone = llm.generate(prompt, params)[0]
        pairs = list(zip(alone.token_ids, out.token_ids, strict=True))
        parted = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if parted is None:
            continue
        (a, b), tops = pairs[parted], [dict(o.outputs[0].logprobs[parted].top) for o in (alone, out)]
        assert all(a in top and b in top for top in tops), (prompt, parted, tops)
        assert tops[0][a] - tops[0][b] < near_tie and tops[1][b] - tops[1][a] < near_tie, (prompt, tops)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_max_tokens_and_stop_strings(llm):
    out = llm.generate("Count: one, two, three, four,", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    full = llm.generate("Count: one, two, three, four,", SamplingParams(temperature=0, max_tokens=20))[0].text
    stop = full.strip().split()[2]
    cut = llm.generate(
        "Count: one, two, three, four,", SamplingParams(temperature=0, max_tokens=20, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)


def test_seeded_sampling_is_reproducible(llm):
    def sample(seed):
        p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=16, seed=seed, ignore_eos=True)
        return llm.generate("Write a poem about the sea.", p)[0].token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stream_concatenates_to_the_text(llm):
    ids = llm.tokenizer.encode("My favourite food is")
    pieces = list(llm.stream(ids, SamplingParams(temperature=0, max_tokens=20)))
    assert len(pieces) > 1
    assert (
        "".join(pieces)
        == llm.generate("My favourite food is", SamplingParams(temperature=0, max_tokens=20))[0].text
    )


def test_preemption_loses_nothing(demo_gguf):
    """A preempted sequence is recomputed from its prompt and output and goes on as if never stopped. With
    f32 products: a recompute is a prompt chunk, whose GEMMs take bfloat16 under the CPU default, so its
    cache would carry other rounding than the one-row decode steps that first wrote it."""
    prompts = ["Tell me about the moon.", "Tell me about the sun.", "Tell me about the stars."]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    roomy = LLM(str(demo_gguf), gemm_dtype="float32").generate(prompts, params, use_tqdm=False)
    tight = LLM(str(demo_gguf), kv_cache_tokens=128, gemm_dtype="float32")  # 8 blocks: too few for all
    assert tight.engine.blocks.num_blocks == 8
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert tight.engine.blocks.num_free == 8


def test_prompt_too_long_is_rejected(llm):
    with pytest.raises(JaxrsError, match="tokens per sequence"):
        llm.generate([1] * (llm.engine.max_model_len + 1), GREEDY)


def test_prompt_logprobs_score_the_prompt(llm):
    """vLLM's RequestOutput.prompt_logprobs: None first, then the prompt token (with its rank) and the
    N likeliest at each position, equal to `score`."""
    ids = llm.tokenizer.encode("The capital of France is Paris")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate(ids, params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    scores = llm.score([ids[:1]], [ids[1:]])[0]
    for token, score, entry in zip(ids[1:], scores, out.prompt_logprobs[1:], strict=True):
        assert entry[token].logprob == pytest.approx(score, abs=1e-5)
        best = min(entry.values(), key=lambda lp: lp.rank)
        assert best.rank == 1 and len(entry) == (1 if entry[token].rank == 1 else 2)
    assert llm.generate(ids, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_logprobs is None


def test_chat_takes_vllms_chat_template_and_its_kwargs(structured_llm):
    """vLLM's `LLM.chat(..., chat_template=, chat_template_kwargs=)`: another template for this call only,
    and more template variables; one that would replace an argument is refused by name."""
    ask = [{"role": "user", "content": "hi"}]
    template = "{{ greeting }}|{% for m in messages %}{{ m.content }}{% endfor %}|"
    one = SamplingParams(temperature=0, max_tokens=1)
    out = structured_llm.chat(ask, one, chat_template=template, chat_template_kwargs={"greeting": "yo"})
    assert out[0].prompt_token_ids == structured_llm.tokenizer.encode("yo|hi|", add_special_tokens=False)
    own = structured_llm.chat(ask, one)[0].prompt_token_ids
    assert own == structured_llm.chat_prompt_ids(ask)  # the model's template is untouched
    with pytest.raises(JaxrsError, match="'tools'"):
        structured_llm.chat(ask, one, chat_template_kwargs={"tools": []})


def test_completion_outputs_carry_vllms_stop_reason_and_cumulative_logprob(structured_llm):
    free = structured_llm.generate("hello", SamplingParams(temperature=0, max_tokens=6, logprobs=0))[0]
    out = free.outputs[0]
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))
    assert out.stop_reason is None and out.finish_reason == "length"
    stop = free.text[2:4]
    cut = structured_llm.generate("hello", SamplingParams(temperature=0, max_tokens=6, stop=[stop]))[0]
    assert cut.outputs[0].stop_reason == stop and cut.outputs[0].cumulative_logprob is None
