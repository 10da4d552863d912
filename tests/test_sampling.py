"""The sampler against a NumPy reference: processed logits, support, seeded draws, distribution,
log-probabilities, validation and flags. Pure functions on a tiny vocabulary, jitted."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.engine.sampling import (
    NEVER,
    SampleOutput,
    SamplingFlags,
    SamplingParams,
    build_sampling_batch,
    first_argmax,
    process_logits,
    resolve_token_ids,
    sample,
    truncated_prompt,
)
from jaxrs.errors import JaxrsError

V = 50
_sample = jax.jit(sample, static_argnames="flags")
_process = jax.jit(process_logits, static_argnames="flags")

# One row per feature, and a few together.
ROWS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, logit_bias={7: 5.0}),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.3,
        frequency_penalty=0.7,
        presence_penalty=-0.4,
        logit_bias={3: -100.0, 11: 4.0, 12: -2.5},
    ),
    SamplingParams(temperature=1.1, repetition_penalty=0.7, frequency_penalty=-1.0, top_p=0.8),
]


def histories(rng: np.random.Generator, n: int) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [rng.integers(0, V, rng.integers(1, 20)).tolist() for _ in range(n)]
    outputs = [rng.integers(0, V, rng.integers(0, 12)).tolist() for _ in range(n)]
    return prompts, outputs


def reference(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """NumPy pipeline: penalties -> bias -> temperature -> top-k -> top-p -> min-p (-inf = dropped)."""
    x = logits.astype(np.float32).copy()
    counts = np.bincount(output, minlength=V).astype(np.float32)
    seen = (np.bincount(prompt, minlength=V) > 0) | (counts > 0)
    rep = np.float32(p.repetition_penalty or 1.0)
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    x = x - (np.float32(p.presence_penalty) * (counts > 0) + np.float32(p.frequency_penalty) * counts)
    for t, b in (p.logit_bias or {}).items():
        x[t] += np.float32(b)
    if not p.temperature:
        return x
    x = x / np.float32(p.temperature)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(V, bool)
    keep[order[: p.top_k or V]] = True
    probs = np.exp(np.where(keep, x, -np.inf) - x.max())
    probs /= probs.sum()
    sorted_probs = probs[order]
    before = np.cumsum(sorted_probs) - sorted_probs
    keep[order[before >= (p.top_p or 1.0)]] = False
    keep &= probs >= (p.min_p or 0.0) * probs.max()
    return np.where(keep, x, -np.inf).astype(np.float32)


def make(params, seeds=None, steps=None, prompts=None, outputs=None, batch=None):
    n = len(params)
    return build_sampling_batch(
        params,
        seeds or list(range(n)),
        steps or [0] * n,
        prompts or [[0]] * n,
        outputs or [[]] * n,
        batch or n,
        V,
    )


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(ROWS), V)) * 3).astype(np.float32)
    prompts, outputs = histories(rng, len(ROWS))
    return logits, prompts, outputs


def test_process_logits_matches_numpy(case):
    logits, prompts, outputs = case
    batch, flags = make(ROWS, prompts=prompts, outputs=outputs)
    assert flags == SamplingFlags(
        all_greedy=False, penalties=True, logit_bias=True, top_logprobs=0, filters=True
    )
    ours = np.asarray(_process(logits, batch, flags))
    for i, p in enumerate(ROWS):
        ref = reference(logits[i], p, prompts[i], outputs[i])
        np.testing.assert_array_equal(np.isinf(ours[i]), np.isinf(ref), err_msg=f"row {i} kept set")
        finite = np.isfinite(ref)
        np.testing.assert_allclose(ours[i][finite], ref[finite], rtol=1e-6, atol=1e-6, err_msg=f"row {i}")
    # Each filter really cut something in the rows that use one.
    assert all(np.isinf(ours[i]).any() for i in (3, 4, 5, 6, 7))


def test_draws_stay_in_the_reference_support_and_greedy_is_the_reference_argmax(case):
    logits, prompts, outputs = case
    draws = 256
    for i, p in enumerate(ROWS):
        ref = reference(logits[i], p, prompts[i], outputs[i])
        # Many seeds of the same row at once: rows never see each other, so this is 256 separate draws.
        batch, flags = make(
            [p] * draws, seeds=list(range(draws)), prompts=[prompts[i]] * draws, outputs=[outputs[i]] * draws
        )
        tokens = np.asarray(_sample(np.repeat(logits[i : i + 1], draws, 0), batch, flags).tokens)
        if p.greedy:
            assert set(tokens.tolist()) == {int(np.argmax(ref))}
            continue
        kept = set(np.flatnonzero(np.isfinite(ref)).tolist())
        assert set(tokens.tolist()) <= kept, f"row {i}"
        probs = np.exp(ref[list(kept)] - ref.max())
        if len(kept) <= 5 and probs.min() / probs.sum() > 0.05:  # all small supports are visited
            assert set(tokens.tolist()) == kept, f"row {i}"


def test_sampled_flags_serve_greedy_batches_with_the_greedy_samplers_outputs(case):
    """One compiled step serves greedy and sampled batches (`runner.step_flags`): under sampled flags an
    all-greedy batch gives exactly what the greedy flags give, penalties and logprobs included, and a
    batch with one sampled row still draws it."""
    logits = case[0][:2]
    greedy = [SamplingParams(temperature=0, logprobs=3), ROWS[1]]
    batch, flags = make(greedy, prompts=case[1][:2], outputs=case[2][:2], batch=2)
    assert flags.all_greedy
    as_sampled = dataclasses.replace(flags, all_greedy=False, filters=True)
    got, want = _sample(logits, batch, as_sampled), _sample(logits, batch, flags)
    for name in SampleOutput._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    jaxpr = str(jax.make_jaxpr(lambda x: sample(x, batch, as_sampled))(logits))
    assert "cond[" in jaxpr and "cond[" not in str(jax.make_jaxpr(lambda x: sample(x, batch, flags))(logits))

    hot = SamplingParams(temperature=50.0)  # near uniform: 64 seeds draw more than one token
    batch, flags = make([hot] * 64, seeds=list(range(64)), batch=64)
    tokens = np.asarray(_sample(np.repeat(logits[:1], 64, 0), batch, flags).tokens)
    assert len(set(tokens.tolist())) > 1


def test_a_seeded_draw_does_not_depend_on_the_batch(case):
    logits, prompts, outputs = case
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    mine = np.random.default_rng(1).standard_normal(V).astype(np.float32)

    def tokens_at(row: int, batch_size: int, others: list[SamplingParams], step: int, pad_to: int = 0) -> int:
        params = list(others[:batch_size])
        params[row] = p
        stacked = np.array(logits[:batch_size])
        stacked[row] = mine
        batch, flags = make(
            params,
            seeds=[99 + j for j in range(batch_size)],
            steps=[step] * batch_size,
            prompts=prompts[:batch_size],
            outputs=outputs[:batch_size],
            batch=pad_to or batch_size,
        )
        batch["seed"][row] = 1234
        stacked = np.concatenate([stacked, np.zeros((len(batch["seed"]) - batch_size, V), np.float32)])
        return int(_sample(stacked, batch, flags).tokens[row])

    others = [dataclasses.replace(r, logprobs=3) for r in ROWS]  # penalties, bias, top logprobs on
    for step in range(6):
        alone = tokens_at(0, 1, [p], step)
        assert tokens_at(0, 8, others, step) == alone
        assert tokens_at(3, 8, others, step) == alone
        assert tokens_at(3, 4, ROWS, step, pad_to=8) == alone  # padded to 8 rows
    # Different seeds, and different steps of one seed, draw differently.
    for seeds, steps in ((list(range(64)), [0] * 64), ([7] * 64, list(range(64)))):
        batch, flags = make([p] * 64, seeds=seeds, steps=steps)
        assert len(set(np.asarray(_sample(np.tile(mine, (64, 1)), batch, flags).tokens).tolist())) > 10


def test_padding_rows_are_greedy_and_neutral():
    batch, flags = make(
        [SamplingParams(temperature=1.0, repetition_penalty=1.2, logit_bias={4: 1.0})], batch=4
    )
    assert batch["temperature"].tolist() == [1.0, 0, 0, 0]
    assert batch["repetition_penalty"].tolist()[1:] == [1.0] * 3
    assert (batch["prompt_ids"][1:] == V).all() and (batch["bias_ids"][1:] == V).all()


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.6, 6)])
def test_the_draws_follow_the_softmax(temperature, top_k):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(V).astype(np.float32)
    draws = 20000
    p = SamplingParams(temperature=temperature, top_k=top_k)
    batch, flags = make([p] * draws, seeds=list(range(draws)))
    tokens = np.asarray(_sample(np.tile(logits, (draws, 1)), batch, flags).tokens)
    ref = reference(logits, p, [], [])
    probs = np.exp(ref - ref.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=V)
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = support.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_first_argmax_is_jnp_argmax():
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 3, (64, V)).astype(np.float32)  # many ties
    x[1] = -np.inf
    x[2, 7:] = np.inf
    x[3, [4, 9]] = np.nan
    x[4] = np.nan
    np.testing.assert_array_equal(jax.jit(first_argmax)(x), np.argmax(x, axis=-1))


def test_a_tiny_top_p_forces_the_argmax():
    logits = np.random.default_rng(3).standard_normal((64, V)).astype(np.float32)
    batch, flags = make([SamplingParams(temperature=2.0, top_p=1e-6)] * 64, seeds=list(range(64)))
    np.testing.assert_array_equal(_sample(logits, batch, flags).tokens, logits.argmax(-1))


@pytest.mark.parametrize("asked", [None, 0, 3, 20])
def test_logprobs_are_those_of_the_raw_logits(case, asked):
    logits, prompts, outputs = case
    params = [dataclasses.replace(r, logprobs=asked if i % 2 else 0) for i, r in enumerate(ROWS)]
    batch, flags = make(params, prompts=prompts, outputs=outputs)
    out = _sample(logits, batch, flags)
    assert isinstance(out, SampleOutput)
    k = {None: 0, 0: 0, 3: 4, 20: 20}[asked]
    assert out.top_ids.shape == out.top_logprobs.shape == (len(ROWS), k)
    assert out.tokens.dtype == out.top_ids.dtype == np.int32
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprobs, raw[np.arange(len(ROWS)), tokens], rtol=1e-6, atol=1e-6)
    top = np.asarray(out.top_logprobs)
    assert (np.diff(top, axis=-1) <= 0).all()
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, axis=-1, kind="stable")[:, :k])
    np.testing.assert_allclose(top, -np.sort(-raw, axis=-1)[:, :k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"x": 1.0}),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", ["ok", ""]),
    ],
)
def test_bad_fields_are_named(field, value):
    with pytest.raises(JaxrsError, match=field if field != "stop" else "stop strings"):
        SamplingParams(**{field: value})


def test_fields_and_defaults():
    p = SamplingParams(n=3, logit_bias={"5": 2}, logprobs=0, presence_penalty=-2, frequency_penalty=2)
    assert p.logit_bias == {5: 2.0} and p.n == 3
    # vLLM's spellings: top_k -1 is "off" (as 0 is), and None for no stop tokens.
    vllm = SamplingParams(top_k=-1, stop_token_ids=None, stop=None)
    assert (vllm.top_k, vllm.stop_token_ids, vllm.stop) == (0, [], [])
    filled = SamplingParams().with_defaults({"repetition_penalty": 1.1, "do_sample": False})
    assert (filled.repetition_penalty, filled.temperature) == (1.1, 0.0)
    assert SamplingParams().with_defaults({}).repetition_penalty == 1.0
    explicit = SamplingParams(repetition_penalty=1.3).with_defaults({"repetition_penalty": 1.1})
    assert explicit.repetition_penalty == 1.3


def test_flags_round_top_logprobs_and_detect_penalties():
    def flags(**kw) -> SamplingFlags:
        return make([SamplingParams(temperature=0), SamplingParams(**kw)], batch=4)[1]

    rounded = {None: 0, 0: 0, 1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 20, 20: 20}
    assert {k: flags(logprobs=k).top_logprobs for k in rounded} == rounded
    assert not flags(repetition_penalty=1.0).penalties and not flags(temperature=1).penalties
    for kw in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.1}, {"frequency_penalty": -0.1}):
        f = flags(**kw)
        assert f.penalties and not f.logit_bias
    assert flags(logit_bias={1: 0.5}).logit_bias and not flags(logit_bias={}).logit_bias
    assert flags(temperature=0).all_greedy and not flags(temperature=0.5).all_greedy
    assert len({flags(), flags(), flags(logprobs=3)}) == 2  # hashable, a static jit argument


def test_the_common_path_carries_no_extras():
    batch, flags = make([SamplingParams(temperature=0.7, top_p=0.9)] * 3, batch=4)
    assert set(batch) == {"temperature", "top_k", "top_p", "min_p", "seed", "step"}
    assert flags == SamplingFlags(
        all_greedy=False, penalties=False, logit_bias=False, top_logprobs=0, filters=True
    )
    batch, _ = make(
        [SamplingParams(frequency_penalty=0.5, logit_bias={9: 1.0}), SamplingParams()],
        prompts=[list(range(17)), [1]],
        outputs=[[4, 4, 4], [2]],
        batch=2,
    )
    assert batch["prompt_ids"].shape == (2, 32) and batch["output_ids"].shape == (2, 16)
    # A row without penalties carries no history.
    assert (batch["prompt_ids"][1] == V).all() and (batch["output_ids"][1] == V).all()
    assert batch["bias_ids"].shape == batch["bias_values"].shape == (2, 4)
    assert batch["prompt_ids"].dtype == batch["bias_ids"].dtype == np.int32


def test_filters_flag_only_when_a_sampled_row_filters():
    assert not make([SamplingParams(temperature=0.8)] * 2)[1].filters
    assert not make([SamplingParams(temperature=0, top_k=5)])[1].filters  # greedy rows never filter
    assert make([SamplingParams(temperature=0.8), SamplingParams(temperature=1, min_p=0.1)])[1].filters


def test_filter_thresholds_with_ties_and_extremes():
    """Bisection thresholds keep exactly what a sort would, ties at the cut included."""
    logits = np.array([[2.0, 2.0, 1.0, 1.0, 1.0, -1.0, -30.0, 5.0]], np.float32)
    cases = [
        (dict(top_k=1), {7}),
        (dict(top_k=2), {0, 1, 7}),  # the tie at the cut stays
        (dict(top_k=3), {0, 1, 7}),
        (dict(top_k=100), set(range(8))),
        (dict(top_p=1e-6), {7}),
        (dict(min_p=np.exp(-3.5)), {0, 1, 7}),
    ]
    for kw, kept in cases:
        batch, flags = make([SamplingParams(temperature=1.0, **kw)])
        out = np.asarray(_process(logits, batch, flags))[0]
        assert set(np.flatnonzero(np.isfinite(out))) == kept, kw


def test_extreme_legal_values_stay_finite():
    """Huge top_k means "off" and a huge repetition penalty stays finite: nothing overflows int32/f32."""
    params = [
        SamplingParams(temperature=1.0, top_k=2**40),
        SamplingParams(temperature=0, repetition_penalty=1e300),
    ]
    batch, flags = make(params, prompts=[[1, 2], [3, 0]], outputs=[[], [4]])
    assert batch["top_k"][0] == V and np.isfinite(batch["repetition_penalty"]).all()
    logits = np.zeros((2, V), np.float32)
    logits[:, 3] = -2.0
    assert np.all(~np.isnan(np.asarray(_process(logits, batch, flags))))


def test_min_tokens_bans_eos_and_stop_tokens_until_its_step():
    """The ban follows the in-loop token index `step`: held at step < min_tokens, lifted at min_tokens;
    rows without min_tokens (and ignore_eos rows, for EOS) are untouched."""
    rows = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], eos_token_ids=(2,)),
        SamplingParams(temperature=0, eos_token_ids=(2,)),
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, eos_token_ids=(2,)),
    ]
    arrays, flags = build_sampling_batch(rows, [0] * 3, [0] * 3, [[1]] * 3, [[]] * 3, 4, V)
    assert flags.bans
    logits = jnp.zeros((4, V)).at[:, 2].set(9.0).at[:, 5].set(8.0)
    for step, banned in ((0, True), (2, True), (3, False)):
        batch = {k: jnp.asarray(v) for k, v in arrays.items()} | {"step": jnp.full(4, step, jnp.int32)}
        out = np.asarray(process_logits(logits, batch, flags))
        assert np.isneginf(out[0, [2, 5]]).all() == banned and np.isfinite(out[0, 2]) != banned
        assert (out[1] == np.asarray(logits[1])).all() and out[2, 2] == 9.0
    with pytest.raises(JaxrsError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_allowed_token_ids_mask_every_other_token():
    rows = [SamplingParams(temperature=0, allowed_token_ids=[3, 7]), SamplingParams(temperature=0)]
    arrays, flags = build_sampling_batch(rows, [0, 0], [0, 0], [[1]] * 2, [[]] * 2, 2, V)
    logits = jnp.arange(2 * V, dtype=jnp.float32).reshape(2, V)
    out = np.asarray(process_logits(logits, {k: jnp.asarray(v) for k, v in arrays.items()}, flags))
    assert set(np.flatnonzero(np.isfinite(out[0]))) == {3, 7}
    assert (out[1] == np.asarray(logits[1])).all()


def test_bans_yield_where_they_would_leave_nothing_to_draw():
    """A row whose allowed tokens (here allowed_token_ids; a grammar's mask alike) are all banned by
    min_tokens draws among them instead of from an all -inf row (which picked token 0, outside both);
    a row with something left keeps its bans."""
    rows = [
        SamplingParams(temperature=0, min_tokens=3, allowed_token_ids=[2], eos_token_ids=(2,)),
        SamplingParams(temperature=1.0, seed=1, min_tokens=3, allowed_token_ids=[2, 5], eos_token_ids=(2,)),
    ]
    arrays, flags = build_sampling_batch(rows, [1, 1], [0, 0], [[1]] * 2, [[]] * 2, 2, V)
    out = _sample(jnp.zeros((2, V)), {k: jnp.asarray(v) for k, v in arrays.items()}, flags)
    assert out.tokens.tolist() == [2, 5]


def test_bad_words_ban_a_last_token_after_the_rest():
    """A one-token word is always banned; a longer one's last token only after its other tokens."""
    p = SamplingParams(bad_words_token_ids=((4,), (6, 9)))
    assert p.banned_ids([1, 2]) == [(4, NEVER)]
    assert p.banned_ids([1, 6]) == [(4, NEVER), (9, NEVER)]
    assert p.bans_follow_output


def test_resolve_token_ids_spells_bad_words_bare_and_spaced():
    class Words:
        def encode(self, text, add_special_tokens=True):
            return {"cat": [1], " cat": [2], "big cat": [3, 1], " big cat": [4, 1]}[text]

    p = resolve_token_ids(SamplingParams(bad_words=["cat", "big cat"]), Words(), [9, 2])
    assert p.bad_words_token_ids == ((1,), (2,), (3, 1), (4, 1)) and p.eos_token_ids == (2, 9)
    assert not p.speculative  # a draft cannot follow a ban that depends on its own tokens


def test_truncated_prompt_keeps_the_last_tokens():
    assert truncated_prompt([1, 2, 3, 4], 2, 100) == [3, 4]
    assert truncated_prompt([1, 2, 3, 4], 9, 100) == [1, 2, 3, 4]
    assert truncated_prompt([1, 2, 3, 4], -1, 3) == [3, 4]
    assert truncated_prompt([1, 2, 3, 4], None, 3) == [1, 2, 3, 4]
