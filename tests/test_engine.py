"""Engine equivalences on the real demo model, greedy: batching, prefix caching, preemption, chunked
prefill and multi-step decode must not change a single token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import resolve_token_ids
from jaxrs.errors import JaxrsError
from jaxrs.llm import WARMUP_PROFILES, request_output
from jaxrs.quant import QuantizedTensor
from jaxrs.quant.tensor import tree_nbytes

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
WORDS = (
    "the cat sat on a warm mat while rain fell softly over the quiet old town and "
    "children ran home from school laughing about the day they had"
).split()
PROMPTS = [" ".join(WORDS[: 3 + 2 * i]) for i in range(16)]  # 3..33 words: lengths cross block boundaries


@pytest.fixture(scope="module")
def llm(demo_gguf):
    return LLM(str(demo_gguf), kv_cache_mb=48)


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list:
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    return [request_output(r, None) for r in requests]


def engine_with(llm: LLM, **knobs) -> Engine:
    """An engine over the demo with f32 products unless `knobs` say otherwise: these tests compare a
    prompt's tokens across batch compositions, and under the CPU default a batch of 4 rows or more takes
    bfloat16 GEMMs (`gemm_dtype`), which can flip a near tie (the second prompt's three likeliest first
    tokens lie within 0.05 in log-probability); `batch_invariant` is the mode that promises that."""
    return Engine(
        llm.model, EngineConfig(**{"kv_cache_mb": 48, "gemm_dtype": "float32", **knobs}), dtype=jnp.float32
    )


@pytest.fixture(scope="module")
def ids(llm):
    return [llm.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(llm, ids):
    engine = engine_with(llm, prefix_caching=False)
    return [run(engine, [p], GREEDY)[0].token_ids for p in ids]


def test_batched_equals_alone(llm, ids, alone):
    engine = engine_with(llm, prefix_caching=False)
    together = run(engine, ids, GREEDY)
    assert [o.token_ids for o in together] == alone
    # the short prompts were prefilled several to a call, grouped by padded length
    rows = {(shape[1], shape[2]) for shape in engine.runner.shapes if shape[0] == "prefill"}
    assert len(rows) >= 2 and all(b > 1 for b, _ in rows), rows


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="exact few-row buckets are CPU's")
def test_three_requests_decode_in_a_three_row_step(llm, ids, alone):
    """On CPU each row of a few-row product is its own GEMV, so three requests take a 3-row step (no
    padding row); their tokens are those of each alone."""
    engine = engine_with(llm, prefix_caching=False)
    assert [engine.runner.rows(n) for n in range(1, 10)] == [1, 2, 3, 4, 8, 8, 8, 8, 16]
    assert [o.token_ids for o in run(engine, ids[:3], GREEDY)] == alone[:3]
    assert {shape[1] for shape in engine.runner.shapes if shape[0] == "decode"} == {3}


def test_long_or_deep_chunks_prefill_alone(llm, ids):
    engine = engine_with(llm, prefix_caching=False)
    long_prompt = (ids[-1] * 4)[:130]  # a 256-token chunk; its blocks need more than the narrowest width
    requests = [engine.add_request(p, GREEDY) for p in (long_prompt, ids[0], ids[1])]
    plan = engine.scheduler.schedule()
    calls = engine._prefill_calls(plan.prefill)
    assert sorted(len(c) for c in calls) == [1, 2]
    assert [c.seq.request_id for c in calls[0]] == [requests[0].request_id]
    for r in requests:
        engine.abort(r.request_id)


def test_xla_options_reach_the_steps(llm, ids, alone):
    from jaxrs.engine.runner import step_xla_options
    from jaxrs.errors import JaxrsError

    assert step_xla_options({"b": "1", "a": "2"}, "gpu") == (("a", "2"), ("b", "1"))
    assert step_xla_options({"a": ""}, "gpu") == ()  # an empty value drops an option
    assert step_xla_options(None, "cpu") == (("xla_cpu_prefer_vector_width", "512"),)  # the CPU default
    assert step_xla_options({"xla_cpu_prefer_vector_width": ""}, "cpu") == ()
    ynn = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    out = run(engine_with(llm, prefix_caching=False, xla_options=ynn), ids[:3], GREEDY)
    assert [o.token_ids for o in out] == alone[:3]
    with pytest.raises(JaxrsError, match="xla_cpu_experimental_ynn_fusion_type"):
        engine_with(llm, xla_options={"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})


def test_unrolled_layers_give_the_same_tokens(llm, ids, alone):
    """Layers unrolled over per-layer weights give the scanned engine's tokens (`alone`); the engine
    splits, then stacks again, the shared tree in place."""
    from jaxrs.errors import JaxrsError

    params = llm.model.params
    try:
        out = run(engine_with(llm, prefix_caching=False, layer_loop="unrolled"), ids[:3], GREEDY)
        assert isinstance(params["layers"], tuple) and len(params["layers"]) == llm.model.config.num_layers
        assert [o.token_ids for o in out] == alone[:3]
    finally:
        engine_with(llm)  # stacked again, for the other tests
    assert params["layers"]["attn"]["q_proj"]["weight"].shape[0] == llm.model.config.num_layers
    with pytest.raises(JaxrsError, match="layer_loop must be one of scan, unrolled, not 'unroll'"):
        engine_with(llm, layer_loop="unroll")


def test_prefix_cache_on_equals_off_and_hits(llm, ids, alone):
    engine = engine_with(llm, prefix_caching=True)
    shared = [ids[-1] + p for p in ids[:4]]  # a 28-token common prefix; 31..37 tokens each
    cold = run(engine, shared, GREEDY)
    hits_before = engine.blocks.stats.hits
    warm = run(engine, shared, GREEDY)
    assert engine.blocks.stats.hits > hits_before
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    # Full blocks of 16, keeping at least the last prompt token to compute:
    assert [o.num_cached_tokens for o in warm] == [16, 32, 32, 32]
    off = run(engine_with(llm, prefix_caching=False), shared, GREEDY)
    assert [o.token_ids for o in off] == [o.token_ids for o in cold]


def test_preemption_gives_identical_tokens(llm, ids, alone):
    engine = engine_with(llm, kv_cache_tokens=96, prefix_caching=False)  # 6 blocks for 16 sequences
    out = run(engine, ids, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in out] == alone


def test_chunked_prefill_equals_whole(llm, ids, alone):
    engine = engine_with(llm, max_num_batched_tokens=16, prefix_caching=False)
    out = run(engine, ids[-4:], GREEDY)
    assert [o.token_ids for o in out] == alone[-4:]


def test_single_step_decode_equals_multi_step(llm, ids, alone):
    out = run(engine_with(llm, max_decode_steps=1, prefix_caching=False), ids[:6], GREEDY)
    assert [o.token_ids for o in out] == alone[:6]


def test_pallas_attention_equals_xla(llm, ids):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    xla = run(engine_with(llm, prefix_caching=False), ids[5:7], params)
    from jaxrs.ops import Kernels

    pallas_engine = Engine(
        llm.model,
        EngineConfig(kv_cache_mb=48, prefix_caching=False),
        kernels=Kernels.from_mapping({"paged_attention": "pallas"}),
        dtype=jnp.float32,
    )
    pallas = run(pallas_engine, ids[5:7], params)
    assert [o.token_ids for o in pallas] == [o.token_ids for o in xla]


def test_float16_kv_cache(llm, ids):
    """`kv_cache_dtype="float16"` under float32 compute: half the bytes per token, and the same greedy
    tokens with log-probabilities within float16's rounding of the float32 cache's."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    full = engine_with(llm, prefix_caching=False, kv_cache_dtype="float32")
    half = engine_with(llm, prefix_caching=False)  # the CPU default cache
    assert half.runner.kv.k.dtype == jnp.float16 and full.runner.kv.k.dtype == jnp.float32
    assert half.blocks.num_blocks == 2 * full.blocks.num_blocks  # same MiB, twice the tokens
    ref, out = run(full, ids[6:9], params), run(half, ids[6:9], params)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    got = [lp.logprob for o in out for lp in o.outputs[0].logprobs]
    want = [lp.logprob for o in ref for lp in o.outputs[0].logprobs]
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) > 0  # the cache really is float16


def test_default_load_is_packed_with_a_float16_cache_on_cpu(llm):
    """The defaults: a GGUF's own quantized bits on the device, a float16 KV cache on CPU."""
    is_qt = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    formats = {leaf.fmt for leaf in jax.tree.leaves(llm.model.params, is_leaf=is_qt) if is_qt(leaf)}
    assert formats == ({"Q8F", "U8M"} if jax.default_backend() == "cpu" else {"Q8_0", "Q4_1"})
    want = jnp.float16 if jax.default_backend() == "cpu" else llm.dtype
    assert llm.engine.kv_dtype == want and llm.engine.runner.kv.k.dtype == want


def test_memory_report_splits_weights_kv_and_the_rest(llm, ids):
    """`Engine.memory()`: the weights' and the pool's own bytes, what was resident beside them, and the
    growth since (step shapes compiling)."""
    engine = engine_with(llm, prefix_caching=False)
    before = engine.memory()
    pool = engine.blocks.num_blocks * engine.blocks.block_size * engine.kv_bytes_per_token
    assert before.weights == tree_nbytes(llm.model.params) and before.kv_pool == pool
    assert before.rest > 0 and before.resident > before.weights + before.kv_pool
    run(engine, ids[:3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    after = engine.memory()
    assert after.compiled >= 0 and after.peak_resident >= after.resident
    line = after.summary()
    assert line.startswith("memory: weights ") and f"KV pool {pool / 2**20:.1f} MiB" in line


def test_kv_cache_dtype_must_be_a_float(llm):
    from jaxrs.errors import JaxrsError

    for bad in ("int8", "float64", "fp8-ish"):
        with pytest.raises(JaxrsError, match="kv_cache_dtype"):
            engine_with(llm, kv_cache_dtype=bad)


def test_n_samples_share_the_prompt_blocks(llm, ids):
    engine = engine_with(llm, prefix_caching=False)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    request = engine.add_request(ids[-1], params)
    engine.step()  # the prompt's prefill, then the fork
    assert len(request.seqs) == 4
    full = len(ids[-1]) // engine.blocks.block_size
    first = request.seqs[0].table.blocks[:full]
    assert all(s.table.blocks[:full] == first for s in request.seqs[1:])
    while engine.has_unfinished():
        engine.step()
    outs = request_output(request, None).outputs
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outs}) == 4
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_frees_blocks(llm, ids):
    engine = engine_with(llm)
    requests = [engine.add_request(p, GREEDY) for p in ids[:5]]
    engine.step()
    engine.step()
    assert engine.blocks.num_used > 0
    for r in requests:
        engine.abort(r.request_id)
    assert not engine.has_unfinished() and engine.blocks.num_used == 0


def test_no_compilation_in_steady_state(llm, ids):
    engine = Engine(
        llm.model,
        EngineConfig(
            kv_cache_mb=48, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, max_decode_steps=4
        ),
        dtype=jnp.float32,
    )
    engine.runner.warmup(WARMUP_PROFILES)
    before = engine.runner.compile_count()
    mixed = [
        GREEDY,
        SamplingParams(temperature=0.8, top_k=40, max_tokens=9, seed=3),
        SamplingParams(temperature=0.7, max_tokens=5, seed=4),
    ] * 2
    run(engine, ids[:6], mixed)
    assert engine.runner.compile_count() == before


def test_score_matches_transformers(demo_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    # transformers dequantizes the file to f32: the same weights, and an f32 cache, to compare closely
    llm = LLM(str(demo_gguf), packed=False, kv_cache_dtype="float32", kv_cache_mb=48)
    prompt, continuation = "The capital of France is", " Paris, a city on the Seine."
    ours = llm.score([prompt], [continuation])[0]
    p_ids = llm.tokenizer.encode(prompt)
    c_ids = llm.tokenizer.encode(continuation, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(
        demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + c_ids])).logits[0]
    ref = torch.log_softmax(logits, -1)[len(p_ids) - 1 : -1].gather(1, torch.tensor(c_ids)[:, None])[:, 0]
    assert len(ours) == len(c_ids)
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-4)
    again = llm.score([prompt], [continuation])[0]  # now through the prefix cache
    np.testing.assert_allclose(again, ours, atol=1e-5)


def test_generated_logprobs_equal_score(llm, ids):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    # f32 products (`engine_with`): under the defaults the scored prompt's GEMMs take bfloat16 on a CPU
    # with bfloat16 dots, where one-row decode does not
    engine = engine_with(llm)
    out = run(engine, [ids[4]], params)[0].outputs[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top alternative
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    scored = engine.score(ids[4], out.token_ids)
    # decode's one-row matmuls sum split rows in another order than scoring's whole-prompt ones
    np.testing.assert_allclose([lp.logprob for lp in out.logprobs], scored, atol=5e-4)


def test_min_tokens_holds_eos_back_inside_a_multi_step_call(llm, ids):
    """EOS forced by logit_bias comes at once without min_tokens, and exactly at token min_tokens
    with it: the ban lifts at the in-loop step, in a 4-step decode call, beside rows without it."""
    engine = engine_with(llm, max_decode_steps=4)
    eos = min(engine._eos)
    forced = SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0})
    held = dataclasses.replace(forced, min_tokens=3)
    out = run(engine, ids[:3], [held, forced, GREEDY])
    assert out[0].token_ids[3:] == [eos] and eos not in out[0].token_ids[:3]
    assert out[0].finish_reason == "stop" and out[1].token_ids == [eos]
    assert out[2].token_ids == run(engine, ids[2:3], GREEDY)[0].token_ids


def test_allowed_and_bad_words_shape_the_output(llm, ids):
    engine = engine_with(llm)
    free = run(engine, ids[:1], GREEDY)[0].token_ids
    allowed = [free[1], free[0]]
    only = run(engine, ids[:1], dataclasses.replace(GREEDY, allowed_token_ids=allowed))[0].token_ids
    assert set(only) <= set(allowed)
    banned = llm.tokenizer.decode([free[0]]).strip()
    params = dataclasses.replace(GREEDY, bad_words=[banned])
    avoided = run(engine, ids[:1], params)[0].token_ids
    assert free[0] not in avoided and avoided != free
    pair = dataclasses.replace(GREEDY, bad_words=[llm.tokenizer.decode(free[2:4])])
    words = resolve_token_ids(pair, llm.tokenizer, []).bad_words_token_ids
    assert any(len(w) == 2 for w in words)
    split = run(engine, ids[:1], pair)[0].token_ids  # one token per call: the ban follows the output
    assert split[:2] == free[:2] and split != free
    assert not any(tuple(split[i : i + len(w)]) == w for w in words for i in range(len(split)))
    with pytest.raises(JaxrsError, match="allowed_token_ids"):
        engine.add_request(ids[0], SamplingParams(allowed_token_ids=[engine.vocab_size]))


def test_truncate_prompt_tokens_feeds_the_last_tokens(llm, ids):
    engine = engine_with(llm)
    cut = run(engine, ids[3:4], dataclasses.replace(GREEDY, truncate_prompt_tokens=4))[0]
    assert cut.prompt_token_ids == ids[3][-4:]
    assert cut.token_ids == run(engine, [ids[3][-4:]], GREEDY)[0].token_ids
