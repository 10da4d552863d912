"""What an engine serving X-LoRA keeps between steps: the X-LoRA model (its classifier, its experts' names
in the LoRA slots, the LoRA layers the classifier scores), each sequence's scalings so far, and the
scalings frozen after `tgt_non_granular_index` generated tokens.

Requests run X-LoRA by naming it (`SamplingParams.lora` = its name, "xlora" unless told otherwise); the
experts sit in LoRA slots beside any plain adapters, under "NAME/EXPERT". mistral.rs's non-granular
scalings: with `tgt_non_granular_index` K, the scalings computed for a sequence's K-th generated token
(the prompt's last token for K = 0) are kept and used for every later token instead of the classifier's.
The scaling pass still runs for such rows (a batch's other rows need it, and the scaling pool stays
complete for the prefix cache); the prefix-cache key carries K, since the K/V after the freeze depends on it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.engine.sequence import Sequence
from jaxrs.errors import JaxrsError
from jaxrs.lora.adapter import Target
from jaxrs.lora.config import LoraConfig
from jaxrs.lora.xlora import MODULE_ORDER, XLoraSpec, read_xlora
from jaxrs.lora.xlora_config import XLoraOptions

LATEST_KEPT = 1024  # requests whose latest scalings stay readable by id after they finish
XLORA_ROUTE = -2  # a row's slot index when it runs X-LoRA (-1: no adapter; >= 0: a plain adapter's slot)
DEFAULT_MAX_RANK = 64  # the LoRA slots' rank when only X-LoRA sizes them


class XLoraServing:
    """The X-LoRA model an engine serves and each sequence's scalings (`[positions, lora layers, experts]`,
    written as steps compute them, kept while the sequence lives)."""

    def __init__(self, options: XLoraOptions, cfg: ModelConfig):
        self.options = options
        self.name = options.name
        self.spec: XLoraSpec = read_xlora(options.path, options.order)
        self.experts = [f"{self.name}/{expert}" for expert, _ in self.spec.adapters]
        self.targets: list[Target] = []  # set by `bind` from the experts' targets, in peft's order
        self.expert_slots: tuple[int, ...] = ()
        self.num_lora_layers = 0
        self.num_layers = cfg.num_layers
        self.classifier = None  # the spec on the device (bound with the slots)
        self._scalings: weakref.WeakKeyDictionary[Sequence, np.ndarray] = weakref.WeakKeyDictionary()
        self._frozen: weakref.WeakKeyDictionary[Sequence, np.ndarray] = weakref.WeakKeyDictionary()
        self._latest: OrderedDict[tuple[str, int], Sequence] = OrderedDict()

    def lora_config(self, given: LoraConfig | None) -> LoraConfig:
        """The LoRA slots' config: the experts first (their slots follow the classifier's order), then the
        plain adapters given, with room for both."""
        if given is not None and any(name.startswith(f"{self.name}/") for name, _ in given.adapters):
            raise JaxrsError(f"LoRA adapter names starting with {self.name + '/'!r} are X-LoRA's experts")
        paths = [path for _, path in self.spec.adapters]
        experts = tuple(zip(self.experts, paths, strict=True))
        if given is None:
            return LoraConfig(experts, len(experts), DEFAULT_MAX_RANK)
        return dataclasses.replace(
            given, adapters=experts + given.adapters, max_loras=given.max_loras + len(experts)
        )

    def bind(self, loras) -> None:
        """Read the experts' slots and targets from the loaded LoRA slots (`LoraSlots`)."""
        self.expert_slots = tuple(loras.slot_of(name) for name in self.experts)
        targets = {t for name in self.experts for t in loras.loaded[name].adapter.weights}
        self.targets = [t for t in MODULE_ORDER if t in targets]
        self.num_lora_layers = self.num_layers * len(self.targets)
        self.classifier = dataclasses.replace(
            self.spec, layers=tuple((jnp.asarray(w), jnp.asarray(b)) for w, b in self.spec.layers)
        )

    def cache_key(self, extra: object = None) -> tuple:
        """Prefix-cache key of an X-LoRA request: its K/V (both pools) belong to this X-LoRA model."""
        return ("xlora", self.name, self.options.path, self.options.tgt_non_granular_index, extra)

    def runs(self, seq: Sequence) -> bool:
        return seq.params.lora == self.name

    # -- non-granular scalings -------------------------------------------------------------------------
    def freeze_at(self, seq: Sequence) -> int:
        """The position whose scalings `seq` keeps for every later one (-1: never frozen)."""
        k = self.options.tgt_non_granular_index
        return -1 if k is None else len(seq.prompt_ids) - 1 + k

    def frozen(self, seq: Sequence) -> np.ndarray | None:
        return self._frozen.get(seq)

    # -- scalings --------------------------------------------------------------------------------------
    def record(self, seq: Sequence, start: int, scalings: np.ndarray) -> None:
        """Keep the scalings of positions [start, start + len(scalings)) of `seq`."""
        end = start + len(scalings)
        held = self._scalings.get(seq)
        if held is None or len(held) < end:
            size = max(end, 2 * (0 if held is None else len(held)))
            grown = np.zeros((size, *scalings.shape[1:]), np.float32)
            if held is not None:
                grown[: len(held)] = held
            held = self._scalings[seq] = grown
        held[start:end] = scalings
        key = (seq.request_id, seq.index)
        self._latest[key] = seq  # read when asked: this step's last positions may outrun its tokens
        self._latest.move_to_end(key)
        while len(self._latest) > LATEST_KEPT:
            self._latest.popitem(last=False)
        at = self.freeze_at(seq)
        if seq not in self._frozen and start <= at < end:
            self._frozen[seq] = np.array(scalings[at - start])

    def scalings(self, seq: Sequence) -> np.ndarray:
        """`[positions, lora layers, experts]`: the classifier's scalings of every position of `seq` fed to
        the model so far (peft's `get_latest_scalings()` over the sequence; zeros where the prefix cache
        served a block), before top-k and the global weight."""
        held = self._scalings.get(seq)
        fed = max(seq.num_tokens - 1, 0)
        if held is None:
            return np.zeros((0, self.num_lora_layers, len(self.experts)), np.float32)
        return held[: min(fed, len(held))].copy()

    def latest(self, request_id: str, index: int = 0) -> np.ndarray | None:
        """`[lora layers, experts]`: the scalings of the last position fed for sample `index` of request
        `request_id` (kept for the last LATEST_KEPT requests, finished or not); None if unknown."""
        seq = self._latest.get((request_id, index))
        scalings = None if seq is None else self.scalings(seq)
        return None if scalings is None or not len(scalings) else scalings[-1]
