"""LoRA served by the engine against peft: greedy tokens and their log-probabilities for each adapter
alone, for a batch mixing both adapters and the base, through the prefix cache (one prompt under two
adapters), on an ISQ base (against peft over the dequantized base), and loading/unloading without
recompiling."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.llm import LLM, request_output
from jaxrs.lora.serving import AdapterInUse
from tests.lora_models import build, peft_model

STEPS = 8
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=5)
PROMPTS = [np.random.default_rng(i).integers(3, 256, 20 + 3 * i).tolist() for i in range(3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("lora-engine"))


def peft_greedy(ref, prompt: list[int], name: str | None) -> tuple[list[int], list[np.ndarray]]:
    """peft's greedy tokens and the log-softmax before each, with adapter `name` (None: disabled)."""
    ids, logprobs = list(prompt), []
    for _ in range(STEPS):
        with torch.no_grad():
            if name is None:
                with ref.disable_adapter():
                    logits = ref(torch.tensor([ids])).logits[0, -1]
            else:
                ref.set_adapter(name)
                logits = ref(torch.tensor([ids])).logits[0, -1]
        logprobs.append(torch.log_softmax(logits, -1).numpy())
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], logprobs


def assert_matches(out, want: tuple[list[int], list[np.ndarray]]) -> None:
    tokens, logprobs = want
    assert out.token_ids == tokens
    for step, lp in zip(out.outputs[0].logprobs, logprobs, strict=True):
        for token, value in step.top:
            assert abs(value - lp[token]) <= 1e-4


def test_each_adapter_alone_and_mixed_equal_peft(models):
    base, adapters = models
    ref = peft_model(base, adapters)
    llm = LLM(
        str(base),
        lora_adapters=adapters,
        max_loras=3,
        max_lora_rank=8,
        kv_cache_tokens=1024,
        kv_cache_dtype="float32",
    )
    names = ["alpha", "beta", None]
    want = {n: [peft_greedy(ref, p, n) for p in PROMPTS] for n in names}
    for name in names:
        for prompt, w in zip(PROMPTS, want[name], strict=True):
            assert_matches(llm.generate(prompt, GREEDY, lora=name, use_tqdm=False)[0], w)
    # one batch: every prompt under every adapter and the base, interleaved
    pairs = [(p, n, w) for n in names for p, w in zip(PROMPTS, want[n], strict=True)][::-1]
    outs = llm.generate([p for p, _, _ in pairs], GREEDY, lora=[n for _, n, _ in pairs], use_tqdm=False)
    for out, (_, _, w) in zip(outs, pairs, strict=True):
        assert_matches(out, w)
    assert want["alpha"][0][0] != want["beta"][0][0] or want["alpha"][0][0] != want[None][0][0]

    # the prefix cache never hands one adapter's KV blocks to another: a new prompt under each in turn,
    # then again under the first, which finds its own blocks
    long = np.random.default_rng(9).integers(3, 256, 40).tolist()
    seen_alpha = False
    for name in [*names, "alpha"]:
        out = llm.generate(long, GREEDY, lora=name, use_tqdm=False)[0]
        assert (out.num_cached_tokens > 0) == (name == "alpha" and seen_alpha), name
        seen_alpha = seen_alpha or name == "alpha"
        assert_matches(out, peft_greedy(ref, long, name))

    # unloading and loading change values, not shapes: nothing compiles
    shapes = llm.engine.runner.compile_count()
    llm.unload_lora("alpha")
    with pytest.raises(JaxrsError, match="no LoRA adapter named 'alpha'"):
        llm.generate(PROMPTS[0], GREEDY, lora="alpha", use_tqdm=False)
    llm.load_lora("alpha2", str(adapters["alpha"]))
    assert sorted(llm.lora_adapters()) == ["alpha2", "beta"]
    assert_matches(llm.generate(PROMPTS[0], GREEDY, lora="alpha2", use_tqdm=False)[0], want["alpha"][0])
    assert llm.engine.runner.compile_count() == shapes

    # unloading an adapter some request still uses waits for it (bounded), or gives up and keeps the
    # adapter, or with `force` ends the request
    request = llm.engine.add_request(PROMPTS[1], dataclasses.replace(GREEDY, lora="beta"))
    with pytest.raises(AdapterInUse, match="still in use by 1 unfinished request"):
        llm.unload_lora("beta", timeout=0)
    assert "beta" in llm.lora_adapters() and not request.finished
    llm.unload_lora("beta")
    assert request.finished and request.seqs[0].finish_reason == "length"
    assert_matches(request_output(request, None), want["beta"][1])
    assert llm.lora_adapters() == ["alpha2"] and llm.engine.blocks.num_used == 0
    request = llm.engine.add_request(PROMPTS[1], dataclasses.replace(GREEDY, lora="alpha2"))
    llm.unload_lora("alpha2", timeout=0, force=True)
    assert request.seqs[0].finish_reason == "abort" and llm.lora_adapters() == []
    assert llm.engine.blocks.num_used == 0


@pytest.mark.slow
@pytest.mark.parametrize("in_pieces", [False, True])
def test_isq_base_equals_peft_over_the_dequantized_base(models, tmp_path, monkeypatch, in_pieces):
    """`in_pieces`: a fusion threshold low enough that every layer weight of the ISQ base is stored in
    pieces along `in` (XLA:CPU's layout of long rows), the adapters' terms added to the pieces' sum."""
    from jaxrs.loading import load_model
    from jaxrs.models.registry import family
    from jaxrs.quant import QuantizedTensor, dequantize
    from jaxrs.quant.in_pieces import InPieces
    from pallas_kernels import qmatmul

    if in_pieces:
        monkeypatch.setattr(qmatmul, "CPU_GEMV_FUSION_BYTES", 128)  # rows of 32 f32 inputs and up split
    base, adapters = models
    loaded = load_model(str(base), dtype="float32", isq="q8_0")
    table = family(loaded.config.architecture).names.hf(loaded.config)
    state, packed = {}, 0
    for path, source in table.items():
        node = loaded.params
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None or not isinstance(source, str):
            continue
        if isinstance(node, QuantizedTensor):
            node, packed = dequantize(node), packed + 1
        node = np.asarray(node)
        if path.startswith("layers."):
            state |= {f"model.layers.{i}.{source}": torch.tensor(node[i]) for i in range(node.shape[0])}
        else:
            state[source] = torch.tensor(node)
    assert packed >= 7
    ref = peft_model(base, adapters, base_state=state)
    llm = LLM(
        str(base),
        isq="q8_0",
        lora_adapters=adapters,
        max_lora_rank=8,
        kv_cache_tokens=512,
        kv_cache_dtype="float32",
        gemm_dtype="float32",
    )
    down = llm.engine.runner.params["layers"]["mlp"]["down_proj"]["weight"]
    assert isinstance(getattr(down, "base", down), InPieces) == (in_pieces and jax.default_backend() == "cpu")
    for name in ("alpha", "beta"):
        assert_matches(
            llm.generate(PROMPTS[0], GREEDY, lora=name, use_tqdm=False)[0], peft_greedy(ref, PROMPTS[0], name)
        )


def test_score_under_each_adapter_equals_peft(models):
    """`LLM.score` (and the perplexity built on it) runs the adapter it is given, one for all prompts or
    one per prompt; the same prompt scored under each in turn never reads another's cached blocks."""
    from jaxrs.eval import perplexity

    base, adapters = models
    ref = peft_model(base, adapters)
    llm = LLM(
        str(base), lora_adapters=adapters, max_lora_rank=8, kv_cache_tokens=512, kv_cache_dtype="float32"
    )
    prompt, cont = PROMPTS[2][:40], PROMPTS[1][:12]

    def peft_logprobs(ids: list[int], start: int, name: str | None) -> np.ndarray:
        """peft's log-probabilities of ids[start:] given the tokens before each."""
        with torch.no_grad():
            if name is None:
                with ref.disable_adapter():
                    logits = ref(torch.tensor([ids])).logits[0]
            else:
                ref.set_adapter(name)
                logits = ref(torch.tensor([ids])).logits[0]
        logprobs = torch.log_softmax(logits[start - 1 : -1], -1).numpy()
        return logprobs[np.arange(len(ids) - start), ids[start:]]

    names = ["alpha", None, "beta", "alpha"]
    want = {n: peft_logprobs(prompt + cont, len(prompt), n) for n in names}
    assert np.abs(want["alpha"] - want[None]).max() > 1e-2
    for name in names:
        got = llm.score([prompt], [cont], lora=name)[0]
        np.testing.assert_allclose(got, want[name], atol=1e-4, err_msg=str(name))
    mixed = llm.score([prompt] * 3, [cont] * 3, lora=["beta", None, "alpha"])
    for got, name in zip(mixed, ["beta", None, "alpha"], strict=True):
        np.testing.assert_allclose(got, want[name], atol=1e-4, err_msg=str(name))

    text = llm.tokenizer.decode(prompt)
    ids = llm.tokenizer.encode(text)
    for name in ("beta", None):
        nll = -peft_logprobs(ids, 1, name).mean()
        assert perplexity(llm, text, lora=name) == pytest.approx(np.exp(nll), rel=1e-4)
    with pytest.raises(JaxrsError, match="no LoRA adapter named 'gamma'"):
        llm.score([prompt], [cont], lora="gamma")


def test_fused_projections_split_as_peft_adapts_them(tmp_path):
    """Phi-3 holds q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`); peft's "all-linear" adapts the
    fused modules: one A, and B's rows split over the projections."""
    from tests.lora_models import save_adapter, tiny_base

    base = tmp_path / "base"
    tiny_base("phi3", base)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", alpha_pattern={"gate_up_proj": 16})
    adapters = {"fused": save_adapter(base, tmp_path / "fused", seed=3, **lora)}
    llm = LLM(str(base), lora_adapters=adapters, dtype="float32", kv_cache_dtype="float32", packed=False)
    ref = peft_model(base, adapters)
    out = llm.generate([PROMPTS[0]], GREEDY, lora="fused", use_tqdm=False)[0]
    assert_matches(out, peft_greedy(ref, PROMPTS[0], "fused"))


def test_vllms_lora_request_loads_and_names_adapters(models):
    """vLLM's `generate(..., lora_request=LoRARequest(name, id, path))`: the adapter is loaded from its path
    on first use (runtime LoRA) and the output is `lora=name`'s; one request per prompt works too."""
    base, adapters = models
    llm = LLM(str(base), enable_runtime_lora=True, max_loras=2, max_lora_rank=8, kv_cache_dtype="float32")

    class LoRARequest:  # vLLM's fields
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    name, path = next(iter(adapters.items()))
    plain = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    got = llm.generate(PROMPTS[:2], plain, lora_request=LoRARequest(name, 1, str(path)), use_tqdm=False)
    assert llm.lora_adapters() == [name]
    want = llm.generate(PROMPTS[:2], plain, lora=name, use_tqdm=False)
    base_out = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want] != [o.token_ids for o in base_out]
    mixed = llm.generate(
        PROMPTS[:2], plain, lora_request=[None, LoRARequest(name, 1, str(path))], use_tqdm=False
    )
    assert [o.token_ids for o in mixed] == [base_out[0].token_ids, want[1].token_ids]
