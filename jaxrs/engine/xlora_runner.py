"""X-LoRA through the paged cache: each step runs the scaling pass, the classifier, then the real pass.

The scaling pass (the base model: peft's `scaling_pass_value` 0; else every expert weighted by that
value) writes its own K/V, which differ from the real pass's, into a second paged pool of as many blocks
(`ModelRunner.paired`, as speculative decoding's draft pool): the engine's block tables index both, so
the block manager allocates, frees, preempts and prefix-caches them together. Its last hidden states go
to the classifier, whose scalings `[rows, tokens, lora layers, experts]` weight the experts per token
in the real pass (`LoraWeight.mix`), in the same jitted call. Rows that do not run X-LoRA share the call:
their mix is their plain adapter's one-hot slot (none: zeros); a call without X-LoRA rows skips the
scaling pass (a static choice, so a second compiled variant).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.engine.compiled_steps import CompiledSteps, StepCall
from jaxrs.engine.runner import (
    ModelRunner,
    Steps,
    _score,
    decode_loop,
    logits_at,
    one_token_meta,
)
from jaxrs.engine.sampling import SampleOutput, sample
from jaxrs.engine.sequence import Sequence
from jaxrs.errors import JaxrsError
from jaxrs.lora.adapter import Target
from jaxrs.lora.weight import bind_mix, is_lora, without_adapters
from jaxrs.lora.xlora import XLoraSpec, classifier_scalings, layer_weights
from jaxrs.lora.xlora_serving import XLORA_ROUTE, XLoraServing
from jaxrs.models.decoder import merge


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["spec", "route", "freeze_at", "frozen", "is_frozen"],
    meta_fields=["expert_slots", "xlora_targets", "targets", "num_slots", "scaling_pass"],
)
@dataclasses.dataclass(frozen=True)
class XLoraRows:
    """A call's rows as X-LoRA sees them. route `[b]`: XLORA_ROUTE, or the row's LoRA slot (-1: none).
    freeze_at `[b]`: the position whose scalings the row keeps for later ones (-1: never); frozen
    `[b, lora layers, experts]` and is_frozen `[b]`: those kept scalings, once computed."""

    spec: XLoraSpec
    route: jax.Array
    freeze_at: jax.Array
    frozen: jax.Array
    is_frozen: jax.Array
    expert_slots: tuple[int, ...]
    xlora_targets: tuple[Target, ...]  # the experts' targets, in the classifier's layer order
    targets: tuple[Target, ...]  # every adapted projection (plain adapters may adapt more)
    num_slots: int
    scaling_pass: bool  # some row runs X-LoRA


def _mix(rows: XLoraRows, weights: jax.Array, num_layers: int) -> dict[Target, jax.Array]:
    """Every adapted projection's per-token slot weights `[layers, b, t, slots]`: X-LoRA rows take their
    experts' weights (`weights` `[b, t, lora layers, experts]`), other rows their slot's one-hot."""
    b, t = weights.shape[:2]
    per_layer = weights.reshape(b, t, num_layers, len(rows.xlora_targets), -1)
    xlora = (rows.route == XLORA_ROUTE)[:, None, None, None]
    plain = jax.nn.one_hot(rows.route, rows.num_slots)[:, None, None, :]  # -1 and -2: all zeros
    slots = jnp.asarray(rows.expert_slots)
    mix = {}
    for target in rows.targets:
        experts = jnp.zeros((b, t, num_layers, rows.num_slots), jnp.float32)
        if target in rows.xlora_targets:
            experts = experts.at[..., slots].set(per_layer[:, :, :, rows.xlora_targets.index(target)])
        mix[target] = jnp.moveaxis(jnp.where(xlora, experts, plain), 2, 0)
    return mix


def _scalings(rows: XLoraRows, hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """The classifier's scalings of the scaling pass's hidden states, the kept ones past a row's freeze."""
    num_lora_layers = rows.frozen.shape[1]
    scalings = classifier_scalings(rows.spec, hidden, num_lora_layers)
    keep = rows.is_frozen[:, None] & (positions > rows.freeze_at[:, None])
    return jnp.where(keep[..., None, None], rows.frozen[:, None], scalings)


def xlora_logits_at(params, cfg, kernels, kv, tokens, meta, index, rows: XLoraRows, embeds=None):
    """The scaling pass over the second pool, the classifier, then the real pass over the first: logits at
    each row's `index`, the pools, and the scalings `[b, t, lora layers, experts]`."""
    main, scaling = kv
    b, t = tokens.shape
    num_lora_layers, n = rows.frozen.shape[1:]
    if rows.scaling_pass:
        spec = rows.spec
        if spec.scaling_pass_value == 0.0:
            scaling_params = without_adapters(params)
        else:  # every expert weighted by the pass value (as peft's dummy scalings)
            dummy = layer_weights(spec, jnp.full((b, t, num_lora_layers, n), spec.scaling_pass_value))
            scaling_params = bind_mix(params, _mix(rows, dummy, cfg.num_layers))
        hidden, scaling = merge(scaling_params, cfg)(tokens, meta, scaling, kernels, embeds)
        scalings = _scalings(rows, hidden, meta.positions)
    else:
        scalings = jnp.zeros((b, t, num_lora_layers, n), jnp.float32)
    mixed = bind_mix(params, _mix(rows, layer_weights(rows.spec, scalings), cfg.num_layers))
    logits, main = logits_at(mixed, cfg, kernels, main, tokens, meta, index, None, embeds)
    return logits, (main, scaling), scalings


def _xlora_prefill(params, kv, tokens, meta, last_index, batch, lora, embeds=None, *, cfg, kernels, flags):
    """`_prefill` with X-LoRA rows: (samples, scalings `[b, t, lora layers, experts]`), and the pools."""
    logits, kv, scalings = xlora_logits_at(params, cfg, kernels, kv, tokens, meta, last_index, lora, embeds)
    return (sample(logits, batch, flags), scalings), kv


def _xlora_decode(
    params, kv, tokens, positions, tables, valid, batch, num_steps, lora, *, cfg, kernels, flags, max_steps
):
    """`_decode` with X-LoRA rows: returns (samples, scalings `[max_steps, b, lora layers, experts]`) and
    the pools. A row reaching its freeze position mid-call keeps that step's scalings for the next ones."""
    rows: XLoraRows = lora
    block_size = kv[0].k.shape[2]

    def forward(step_params, carry, tok, pos):
        pools, frozen, is_frozen = carry
        step_rows = dataclasses.replace(rows, frozen=frozen, is_frozen=is_frozen)
        meta = one_token_meta(block_size, pos, tables, valid)
        logits, pools, scalings = xlora_logits_at(
            step_params, cfg, kernels, pools, tok[:, None], meta, jnp.zeros_like(pos), step_rows
        )
        now = pos == rows.freeze_at
        frozen = jnp.where(now[:, None, None], scalings[:, 0], frozen)
        return logits, (pools, frozen, is_frozen | now), scalings[:, 0]

    extra = jax.ShapeDtypeStruct(rows.frozen.shape, jnp.float32)
    carry = (kv, rows.frozen, rows.is_frozen)
    (outs, scalings), (kv, _, _) = decode_loop(
        forward, params, carry, tokens, positions, batch, num_steps, extra, cfg, flags, max_steps
    )
    return (outs, scalings), kv


def _xlora_score(params, kv, tokens, meta, targets, lora=None, *, cfg, kernels):
    """Scoring runs the base model (or a plain adapter's slot) over the first pool (the second is
    passed through)."""
    logprobs, main = _score(params, kv[0], tokens, meta, targets, lora, cfg=cfg, kernels=kernels)
    return logprobs, (main, kv[1])


@functools.cache
def jitted_xlora_steps(xla_options: tuple[tuple[str, str], ...] = ()) -> Steps:
    """X-LoRA's steps compiled with `xla_options`; `kv` is the pair of pools, donated."""
    jit = functools.partial(jax.jit, donate_argnames=("kv",), compiler_options=dict(xla_options) or None)
    return Steps(
        prefill=jit(_xlora_prefill, static_argnames=("cfg", "kernels", "flags")),
        decode=jit(_xlora_decode, static_argnames=("cfg", "kernels", "flags", "max_steps")),
        score=jit(_xlora_score, static_argnames=("cfg", "kernels")),
        logits=None,  # constrained rows take the fused decode (`overlap_masks` off)
        sample=None,
    )


class XLoraRunner(ModelRunner):
    """A `ModelRunner` whose steps run X-LoRA rows beside plain ones, over its KV pool and the scaling
    pass's pool; each step's scalings go to `xlora` (`XLoraServing`). Other step sets given to `_run`
    (speculative verify) see the first pool only."""

    def __init__(self, cfg, params, *, xlora: XLoraServing, **options):
        super().__init__(cfg, params, **options)
        if options.get("mesh") is not None:
            raise JaxrsError("X-LoRA is not served on a tensor-parallel mesh")
        if isinstance(params["layers"], tuple):
            raise JaxrsError("X-LoRA needs stacked layers (layer_loop 'scan')")
        self.xlora = xlora
        self.scaling = self.paired(cfg, params)  # its KV pool is the scaling pass's
        self.steps = jitted_xlora_steps(self.xla_options)
        self.overlap_masks = False  # the scaling pass would need its own split of the decode call
        self.compiled = CompiledSteps(self.steps, params, (self.kv, self.scaling.kv))
        lora = next(w for w in jax.tree.leaves(params["layers"], is_leaf=is_lora) if is_lora(w))
        self._num_slots = lora.a.shape[1]
        self._targets = tuple(
            (group, proj)
            for group in ("attn", "mlp")
            for proj, node in params["layers"].get(group, {}).items()
            if isinstance(node, dict) and is_lora(node.get("weight"))
        )

    def release(self) -> None:
        self.scaling.release()
        super().release()

    def _run(self, call: StepCall, fetch, compiled: CompiledSteps | None = None):
        if compiled is not None:  # another set of steps over the first pool
            return super()._run(call, fetch, compiled)
        self.kv = (self.kv, self.scaling.kv)  # the steps take (and give back) both pools
        try:
            return super()._run(call, fetch)
        finally:
            self.kv, self.scaling.kv = self.kv

    def _lora_slots(self, seqs: Seq[Sequence], batch: int) -> XLoraRows:
        """The call's rows for the X-LoRA steps (where a plain runner passes each row's adapter slot)."""
        xlora = self.xlora
        route = np.full(batch, -1, np.int32)
        freeze_at = np.full(batch, -1, np.int32)
        frozen = np.zeros((batch, xlora.num_lora_layers, len(xlora.experts)), np.float32)
        is_frozen = np.zeros(batch, bool)
        for i, seq in enumerate(seqs):
            if xlora.runs(seq):
                route[i], freeze_at[i] = XLORA_ROUTE, xlora.freeze_at(seq)
                kept = xlora.frozen(seq)
                if kept is not None:
                    frozen[i], is_frozen[i] = kept, True
            elif self.lora_slot is not None:
                route[i] = self.lora_slot(seq)
        return XLoraRows(
            xlora.classifier,
            route,
            freeze_at,
            frozen,
            is_frozen,
            xlora.expert_slots,
            tuple(xlora.targets),
            self._targets,
            self._num_slots,
            not seqs or bool((route == XLORA_ROUTE).any()),  # warm-up (no rows) compiles X-LoRA's variant
        )

    def prefill(self, chunks: Seq[tuple[Sequence, int, int]]) -> SampleOutput:
        """`ModelRunner.prefill`, keeping the X-LoRA rows' scalings of the chunk's positions."""
        out, scalings = super().prefill(chunks)
        for i, (seq, start, end) in enumerate(chunks):
            if self.xlora.runs(seq):
                self.xlora.record(seq, start, scalings[i, : end - start])
        return out

    def decode(self, seqs: list[Sequence], num_steps: int) -> SampleOutput:
        """`ModelRunner.decode`, keeping the X-LoRA rows' scalings of the positions fed."""
        out, scalings = super().decode(seqs, num_steps)
        for i, seq in enumerate(seqs):
            if self.xlora.runs(seq):
                self.xlora.record(seq, seq.num_tokens - 1, scalings[:, i])
        return out
