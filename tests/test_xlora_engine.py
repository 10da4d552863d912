"""X-LoRA served by the engine against peft's `XLoraModel` (use_cache=False): through the paged cache with
chunked prefill, the scalings equal `get_latest_scalings()` and the logits equal peft's over a prompt and
8 greedy tokens; rows of mixed lengths batched with a plain row equal each alone; no KV block is left
behind after an abort or a preemption, and a preempted row recomputes to the same tokens; the server
answers with the scalings when asked; non-granular scalings freeze after K generated tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.llm import LLM
from tests.lora_models import build_xlora, peft_model

STEPS = 8
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_xlora(tmp_path_factory.mktemp("xlora-engine"))


@pytest.fixture(scope="module")
def llm(models):
    base, folder, _ = models
    return LLM(
        str(base),
        xlora=str(folder),
        kv_cache_tokens=256,
        kv_cache_dtype="float32",
        max_num_batched_tokens=16,  # prompts of 20+ tokens prefill in chunks
        block_size=16,
        max_num_seqs=4,
        enable_runtime_lora=True,  # a plain adapter beside the experts; every projection adapted
    )


def peft_greedy(ref, prompt: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """peft's greedy tokens, the log-softmax before each, and the scalings of the whole sequence."""
    ids, logprobs = list(prompt), []
    for _ in range(STEPS):
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        logprobs.append(torch.log_softmax(logits, -1).numpy())
        ids.append(int(logits.argmax()))
    with torch.no_grad():
        ref(input_ids=torch.tensor([ids[:-1]]), use_cache=False)
    return ids[len(prompt) :], np.stack(logprobs), ref.get_latest_scalings().numpy()[0]


def base_greedy(base, prompt: list[int], model=None) -> list[int]:
    """The base model's greedy tokens (transformers, no adapters), or `model`'s."""
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False)
    return out[0, len(prompt) :].tolist()


def lora_greedy(base, adapter: str, prompt: list[int]) -> list[int]:
    """peft's greedy tokens with one plain LoRA adapter."""
    return base_greedy(base, prompt, peft_model(base, {"plain": adapter}))


def assert_matches(out, want) -> None:
    tokens, logprobs, scalings = want
    assert out.token_ids == tokens
    for step, lp in zip(out.outputs[0].logprobs, logprobs, strict=True):
        for token, value in step.top:
            assert abs(value - lp[token]) <= 1e-4
    ours, cached = out.outputs[0].xlora_scalings, out.num_cached_tokens  # cached blocks: not computed
    assert ours.shape == scalings.shape
    assert np.abs(ours[cached:] - scalings[cached:]).max() <= 1e-5


PROMPTS = [np.random.default_rng(i).integers(3, 256, n).tolist() for i, n in enumerate((21, 5, 37))]


def test_engine_equals_peft_alone_and_batched(models, llm):
    _, _, ref = models
    want = [peft_greedy(ref, p) for p in PROMPTS]
    for prompt, w in zip(PROMPTS, want, strict=True):
        assert_matches(llm.generate(prompt, GREEDY, use_tqdm=False)[0], w)
    # batched: mixed lengths, with a base row and a plain LoRA row among them; the prefix cache is warm now
    expert = str(models[1].parent / "e1")
    llm.load_lora("plain", expert)
    outs = llm.generate(
        [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[0]],
        GREEDY,
        lora=["xlora", None, "xlora", "plain"],
        use_tqdm=False,
    )
    llm.unload_lora("plain")
    assert_matches(outs[0], want[2])
    assert_matches(outs[2], want[1])
    base = base_greedy(models[0], PROMPTS[0])
    assert outs[1].token_ids == base and outs[1].outputs[0].xlora_scalings is None
    assert base != want[0][0]  # the experts change the tokens
    assert outs[3].token_ids == lora_greedy(models[0], expert, PROMPTS[0]) != base
    with pytest.raises(JaxrsError, match="is an expert of the X-LoRA model"):
        llm.unload_lora("xlora/0")


def test_preemption_recomputes_both_pools_and_nothing_leaks(llm):
    """Three long X-LoRA rows do not fit the pool together: one is preempted and recomputed (both pools,
    partly from the prefix cache the alone runs filled), and each still equals its run alone."""
    engine = llm.engine
    params = SamplingParams(max_tokens=72, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in PROMPTS]
    before = engine.scheduler.num_preemptions
    together = llm.generate(PROMPTS, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > before
    assert [o.token_ids for o in together] == alone
    assert engine.blocks.num_used == 0
    request = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=72, lora="xlora"))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(request.request_id)
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()
    # scoring runs the base model over the first pool
    assert len(engine.score(PROMPTS[1], PROMPTS[0][:4])) == 4


def test_bad_options(models):
    base, folder, _ = models
    with pytest.raises(JaxrsError, match="tgt_non_granular_index given without xlora"):
        LLM(str(base), tgt_non_granular_index=2, kv_cache_tokens=256)
    with pytest.raises(JaxrsError, match="speculative decoding is not served beside X-LoRA"):
        LLM(str(base), xlora=str(folder), speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_server_answers_with_scalings(llm):
    import openai

    from server import create_app
    from tests.live_server import serve

    messages = [{"role": "user", "content": "w5 w9 w17 w33"}]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = llm.chat(messages, params, use_tqdm=False)[0]
    with serve(create_app(llm, served_model_name="tiny")) as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = oai.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4, temperature=0, extra_body={"xlora_scalings": True}
        )
        plain = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == want.text
    scalings = np.asarray(r.model_extra["xlora_scalings"][0])
    assert np.abs(scalings - want.outputs[0].xlora_scalings[-1]).max() <= 1e-6
    assert "xlora_scalings" not in (plain.model_extra or {})


def test_non_granular_scalings_freeze_after_k_tokens(models, llm):
    """mistral.rs's tgt_non_granular_index K: the scalings of the K-th generated token's position are kept
    for every later one (frozen inside a multi-token decode call too); tokens before that equal peft's."""
    _, _, ref = models
    xlora = llm.engine.xlora
    granular = xlora.options
    tokens, _, scalings = peft_greedy(ref, PROMPTS[1])
    xlora.options = dataclasses.replace(granular, tgt_non_granular_index=2)
    try:
        out = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0]
    finally:
        xlora.options = granular
    ours, at = out.outputs[0].xlora_scalings, len(PROMPTS[1]) - 1 + 2
    assert np.abs(ours[: at + 1] - scalings[: at + 1]).max() <= 1e-5
    assert (ours[at + 1 :] == ours[at]).all()
    assert np.abs(scalings[at + 1 :] - scalings[at]).max() > 1e-2  # peft's keep changing
    assert out.token_ids[:3] == tokens[:3]


def test_command_line_flags(tmp_path):
    import argparse

    from jaxrs.lora.cli_args import add_lora_args, lora_kwargs
    from jaxrs.lora.xlora_config import xlora_options

    p = argparse.ArgumentParser()
    add_lora_args(p)
    flags = ["--xlora", str(tmp_path), "--xlora-order", "o.json", "--tgt-non-granular-index", "3"]
    args = p.parse_args(flags)
    options = xlora_options(lora_kwargs(args))["xlora"]
    assert (options.path, options.order, options.tgt_non_granular_index) == (str(tmp_path), "o.json", 3)
    assert "xlora" not in xlora_options(lora_kwargs(p.parse_args([])))
