"""The verifier: which draft tokens the target keeps, exactly (Leviathan et al. 2023; Chen et al. 2023).

Row by row, draft token d_j (proposed from the draft distribution q_j) is accepted with probability
min(1, p_j(d_j) / q_j(d_j)), where p_j is the target's distribution at that position; at the first
rejection the token is drawn from the residual norm(max(0, p_j - q_j)) instead, and when all K are
accepted a bonus token is drawn from p_K. Every emitted token is then distributed as the target alone
would draw it. p and q are the distributions after the request's processors (`sampling.process_logits`),
so a request's penalties, bias, temperature and filters shape both alike. Greedy rows accept while the
draft equals the target's argmax and emit the target's argmax where it differs: token for token what
plain greedy decoding gives. Prompt-lookup proposals are one-hot q (q(d_j) = 1).

Randomness depends only on the request's seed and each token's index: the accept tests, the draft's own
draws and the residual draws use separate streams (the seed XOR a salt); the residual and bonus draws
use the plain sampler's own stream, so a row without proposals draws what plain decoding would.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrs.engine.sampling import draw, first_argmax

ACCEPT_SALT = 0x5BD1E995  # seed stream of the accept tests
DRAFT_SALT = 0x27D4EB2F  # seed stream of the draft model's own draws


class Verdict(NamedTuple):
    tokens: jax.Array  # [B, K + 1] int32: accepted drafts, then the residual or bonus token; past it, junk
    num_accepted: jax.Array  # [B] int32: leading drafts kept (the row emits num_accepted + 1 tokens)


def salted(seeds: jax.Array, salt: int) -> jax.Array:
    """Another seed stream from the same request seeds."""
    return seeds ^ jnp.uint32(salt)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """Where a rejected token is drawn from: max(0, p - q), unnormalized (the draw normalizes)."""
    return jnp.maximum(p - q, 0.0)


def verify(
    processed: jax.Array,
    drafts: jax.Array,
    q: jax.Array | None,
    num_drafts: jax.Array,
    greedy: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
) -> Verdict:
    """Verify drafts against the target.

    processed: [B, K + 1, V] target logits after the request's processors (-inf: excluded);
    drafts: [B, K] proposed tokens; q: [B, K, V] draft probabilities after the same processors, or None
    for one-hot proposals; num_drafts: [B] how many of a row's K drafts are real (the rest are rejected
    unseen, and the token there is drawn from p itself); greedy: [B] rows decoded by argmax;
    seeds: [B] uint32 request seeds; steps: [B] index of the row's first new token.
    """
    b, k = drafts.shape
    vocab = processed.shape[-1]
    rows = jnp.arange(b)
    positions = jnp.arange(k)
    p = jax.nn.softmax(processed, axis=-1)
    if q is None:
        q = jax.nn.one_hot(drafts, vocab, dtype=p.dtype)
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accept_keys = jax.vmap(lambda s: jax.random.key(s))(salted(seeds, ACCEPT_SALT))
    u = jax.vmap(
        lambda key, step: jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, step + j)))(positions)
    )(accept_keys, steps)
    argmax = first_argmax(processed)  # [B, K + 1]
    accept = jnp.where(greedy[:, None], argmax[:, :k] == drafts, u * q_draft < p_draft)
    accept &= positions[None, :] < num_drafts[:, None]
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=-1), axis=-1, dtype=jnp.int32)
    # The token after the kept drafts: from the residual where a real draft was rejected, else from p.
    p_next = p[rows, num_accepted]
    q_next = q[rows, jnp.minimum(num_accepted, k - 1)]
    rejected = num_accepted < num_drafts
    rest = jnp.where(rejected[:, None], residual(p_next, q_next), p_next)
    # p == q leaves nothing (and then nothing is ever rejected); rounding may: fall back to p.
    rest = jnp.where(jnp.sum(rest, axis=-1, keepdims=True) > 0, rest, p_next)
    drawn = draw(jnp.log(rest), seeds, steps + num_accepted)
    next_token = jnp.where(greedy, argmax[rows, num_accepted], drawn)
    tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), drafts.dtype)], axis=1)
    return Verdict(tokens.at[rows, num_accepted].set(next_token), num_accepted)
