"""Decode for a batch holding constrained rows, with the token masks filled while the device works.

A grammar's mask for the next token depends on the token just sampled, so it can only be filled once
that token is back on the host; but the forward pass does not need it, only the sampler does. So such
a batch runs as two calls: the forward pass (`logits`) is dispatched first, and JAX returns at once
while the device runs it; the host then builds the sampler's inputs and fills the constrained rows'
masks (the grammar library's work), and the sampler (`sample`) takes them and the logits the forward
left on the device. vLLM does the same: its grammar bitmask is filled during the forward and applied
in the sampler. A batch of free rows only keeps the single fused `decode` call (no mask to wait for).

The logits never leave the device: the sample call names them by their shape (`held_logits`), and the
runner hands over what its last `logits` call returned, so a step call still pickles for the processes
that follow process 0 (`jaxrs.parallel.multihost`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.engine.compiled_steps import StepCall
from jaxrs.engine.sampling import SampleOutput, SamplingFlags, SamplingParams
from jaxrs.engine.sequence import Sequence
from jaxrs.structured.state import fill_token_masks

if TYPE_CHECKING:
    from jaxrs.engine.runner import ModelRunner


def held_logits(rows: int, vocab_size: int) -> jax.ShapeDtypeStruct:
    """The placeholder a `sample` call carries for the logits its `logits` call left on the device."""
    return jax.ShapeDtypeStruct((rows, vocab_size), jnp.float32)


def is_held(arg: object) -> bool:
    """Whether a step call's argument stands for the held logits (the runner hands them over)."""
    return isinstance(arg, jax.ShapeDtypeStruct)


def logits_call(runner: ModelRunner, tokens, positions, tables, valid, lora=None) -> StepCall:
    """The forward pass of one decode iteration over b rows with w-block tables; labelled (b, w)."""
    args = (tokens, positions, tables, valid, lora)
    return StepCall("logits", args, runner._statics(), tables.shape)


def sample_call(runner: ModelRunner, batch: dict, flags: SamplingFlags) -> StepCall:
    """The sampler over the held logits of b rows; labelled (b, profile)."""
    from jaxrs.engine.runner import profile

    rows = len(batch["temperature"])
    args = (held_logits(rows, runner.cfg.vocab_size), batch)
    return StepCall("sample", args, {"flags": flags}, (rows, profile(flags)))


def masked_decode(
    runner: ModelRunner, seqs: list[Sequence], tokens, positions, tables, valid, lora=None
) -> SampleOutput:
    """One token for each of `seqs` (some constrained): the forward dispatched, then the masks filled
    while it runs, then the sampler. Arrays come back as [1, len(seqs), ...], as `decode`'s do."""
    runner._run(logits_call(runner, tokens, positions, tables, valid, lora), lambda logits: logits)
    batch, flags = runner._sampling(seqs, len(tokens), masks=False)
    fill_token_masks([s.grammar for s in seqs], batch["token_mask"])
    rows = len(seqs)
    return runner._run(
        sample_call(runner, batch, flags), lambda out: jax.tree.map(lambda a: np.asarray(a)[None, :rows], out)
    )


def masked_warmup_calls(runner: ModelRunner, profiles: list[SamplingParams]) -> list[StepCall]:
    """The constrained batches' shapes, fewest rows first: the forward at every rows and width bucket,
    the sampler at every rows bucket for each decode profile (dummy rows write nothing)."""
    calls = []
    for b in runner.buckets()[1]:
        zeros, lora = np.zeros(b, np.int32), runner._lora_slots([], b)
        for w in runner.widths(decode=True):
            tables = np.zeros((b, w), np.int32)
            calls.append(logits_call(runner, zeros, zeros, tables, np.zeros(b, bool), lora))
        calls += [sample_call(runner, *runner.profile_batch(p, b)) for p in profiles]
    return calls
