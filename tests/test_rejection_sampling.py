"""The verifier alone: emitted tokens follow the target distribution p whatever the draft's q, greedy
rows keep exactly the target's argmax path, and a broken rule is caught by the same test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs.engine import rejection_sampling
from jaxrs.engine.rejection_sampling import verify
from jaxrs.engine.sampling import draw

V, K, N = 6, 2, 6_000
CHI2_CRITICAL = 20.52  # chi-square, 5 degrees of freedom, p = 0.001


def distributions(seed: int):
    rng = np.random.default_rng(seed)
    p_logits = rng.normal(0, 1.2, size=(K + 1, V)).astype(np.float32)
    q_logits = rng.normal(0, 1.2, size=(K, V)).astype(np.float32)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    return p_logits, p, q


def chi2(tokens: np.ndarray, p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=V)
    expected = p * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


KEEP = object()
VERIFY = jax.jit(verify)
DRAW = jax.jit(draw)


def run(p_logits, q, *, told_q=KEEP, verifier=VERIFY):
    """N seeded rows: drafts drawn from q (their own stream), verified against p with the verifier told
    `told_q` as the draft distribution (by default q itself; None: one-hot)."""
    told_q = q if told_q is KEEP else told_q
    seeds = jnp.arange(N, dtype=jnp.uint32)
    drafts = jnp.stack(
        [DRAW(jnp.broadcast_to(jnp.log(q[j]), (N, V)), seeds ^ 99, jnp.full(N, j)) for j in range(K)], 1
    )
    verdict = verifier(
        jnp.broadcast_to(p_logits, (N, K + 1, V)),
        drafts,
        None if told_q is None else jnp.broadcast_to(jnp.asarray(told_q), (N, K, V)),
        jnp.full(N, K),
        jnp.zeros(N, bool),
        seeds,
        jnp.zeros(N, jnp.int32),
    )
    return np.asarray(verdict.tokens), np.asarray(verdict.num_accepted)


@pytest.mark.parametrize("seed", [0, 1])
def test_emitted_tokens_follow_p(seed):
    p_logits, p, q = distributions(seed)
    tokens, accepted = run(p_logits, q)
    assert chi2(tokens[:, 0], p[0]) < CHI2_CRITICAL
    assert chi2(tokens[accepted >= 1, 1], p[1]) < CHI2_CRITICAL  # after a kept draft, position 1 is p_1's
    assert chi2(tokens[accepted == 2, 2], p[2]) < CHI2_CRITICAL  # the bonus token
    # acceptance matches the theory: P(accept d_1) = sum_x min(p(x), q(x))
    assert abs(np.mean(accepted >= 1) - np.minimum(p[0], q[0]).sum()) < 0.02


def test_broken_rules_fail_the_same_test(monkeypatch):
    """The chi-square test can fail: drawing a rejected position from p instead of the residual, or
    accepting every draft (a verifier told q = p), both emit tokens that do not follow p."""
    p_logits, p, q = distributions(0)
    with monkeypatch.context() as m:
        m.setattr(rejection_sampling, "residual", lambda p, q: p)
        tokens, _ = run(p_logits, q, verifier=jax.jit(lambda *args: verify(*args)))  # traced anew
    assert chi2(tokens[:, 0], p[0]) > 10 * CHI2_CRITICAL
    tokens, accepted = run(p_logits, q, told_q=np.broadcast_to(p[:K], (K, V)))
    assert accepted.min() == K and chi2(tokens[:, 0], p[0]) > 10 * CHI2_CRITICAL


def test_one_hot_rule_is_exact_for_any_proposal():
    """Prompt lookup's rule (q one-hot: accept d with probability p(d), else draw from p without d) keeps
    p whatever proposed d, a draft model's samples included; it only accepts less often."""
    p_logits, p, q = distributions(0)
    tokens, accepted = run(p_logits, q, told_q=None)
    exact, exact_accepted = run(p_logits, q)
    assert chi2(tokens[:, 0], p[0]) < CHI2_CRITICAL
    assert np.mean(accepted >= 1) < np.mean(exact_accepted >= 1)


def test_greedy_rows_keep_the_argmax_path():
    p_logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, K + 1, V)), jnp.float32)
    best = np.asarray(jnp.argmax(p_logits, -1))
    drafts = np.array([best[0, :K], [best[1, 0], (best[1, 1] + 1) % V], [(best[2, 0] + 1) % V, 0]])
    verdict = VERIFY(
        p_logits,
        jnp.asarray(drafts),
        None,
        jnp.full(3, K),
        jnp.ones(3, bool),
        jnp.zeros(3, jnp.uint32),
        jnp.zeros(3, jnp.int32),
    )
    assert np.asarray(verdict.num_accepted).tolist() == [2, 1, 0]
    tokens = np.asarray(verdict.tokens)
    assert tokens[0].tolist() == best[0].tolist()  # both drafts, then the bonus argmax
    assert tokens[1, :2].tolist() == best[1, :2].tolist() and tokens[2, 0] == best[2, 0]


def test_rows_without_drafts_draw_as_plain_sampling():
    p_logits, _, q = distributions(2)
    n = N  # the shapes `run` compiled
    seeds, steps = jnp.arange(n, dtype=jnp.uint32), jnp.arange(n, dtype=jnp.int32)
    processed = jnp.broadcast_to(p_logits, (n, K + 1, V))
    verdict = VERIFY(
        processed,
        jnp.zeros((n, K), jnp.int32),
        jnp.broadcast_to(q, (n, K, V)),
        jnp.zeros(n, jnp.int32),
        jnp.zeros(n, bool),
        seeds,
        steps,
    )
    assert (np.asarray(verdict.num_accepted) == 0).all()
    plain = DRAW(processed[:, 0], seeds, steps)
    assert np.asarray(verdict.tokens[:, 0]).tolist() == np.asarray(plain).tolist()
