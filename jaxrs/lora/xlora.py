"""X-LoRA (peft's `XLoraConfig`, the format mistral.rs reads too): a mixture of LoRA experts whose weights a
small classifier picks per token and per adapted layer from the base model's hidden states.

Two passes over the same tokens: the scaling pass runs the base model (adapters off: peft's default
`scaling_pass_value` of 0), the classifier turns its last hidden states into scalings
`[rows, tokens, lora layers, adapters]` (softmax with a temperature; broadcast over the layers unless
`layerwise_scalings`), then the real pass runs every adapter weighted by them (top-k masked, optionally
re-softmaxed over the kept ones, times `global_scaling_weight`), through the `LoraWeight`'s per-token
`mix`. The LoRA layers are numbered as peft numbers them: layer by layer, each layer's adapted projections
in module order.

`XLoraModel.run` recomputes the whole sequence each call (like peft with `use_cache=False`): the
reference. The engine serves X-LoRA through the paged cache (`jaxrs.engine.xlora_runner`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.lora.adapter import Target
from jaxrs.lora.config import LoraConfig
from jaxrs.lora.slots import LoraSlots
from jaxrs.lora.weight import bind_mix, bind_slots
from jaxrs.models.decoder import merge
from jaxrs.models.layers import AttentionMetadata, allocate_kv_cache
from jaxrs.ops import Kernels
from pallas_kernels.shapes import next_power_of_2

# module order inside a decoder layer, as transformers builds it (peft numbers LoRA layers in this order)
MODULE_ORDER = [("attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")
]
_CLASSIFIER = re.compile(r"(?:^|\.)layers\.(\d+)\.(weight|bias)$")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["layers"],
    meta_fields=[
        "adapters",
        "enable_softmax",
        "enable_softmax_topk",
        "softmax_temperature",
        "layerwise_scalings",
        "top_k_lora",
        "global_scaling_weight",
        "scaling_pass_value",
    ],
)
@dataclasses.dataclass(frozen=True)
class XLoraSpec:
    """The classifier (Linear layers `[out, in]` with biases, ReLU between) and how its output is used.
    A pytree: the classifier's arrays are its leaves, so a jitted step takes them as an argument and
    the rest as static."""

    adapters: tuple[tuple[str, str], ...]  # (name, folder), in classifier order
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    global_scaling_weight: float = 1.0
    scaling_pass_value: float = 0.0  # every adapter's scaling in the scaling pass (0: the base model)


def _read_config(folder: Path) -> dict:
    """peft's `adapter_config.json` (peft_type XLORA), else the original xlora layout's
    `xlora_config.json`."""
    for name, peft in (("adapter_config.json", True), ("xlora_config.json", False)):
        config_file = folder / name
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise JaxrsError(f"X-LoRA: {config_file} is not JSON ({e})") from None
        if peft and config.get("peft_type") != "XLORA":
            raise JaxrsError(f"X-LoRA: {config_file} is a {config.get('peft_type')} config, not XLORA")
        if not isinstance(config.get("adapters"), dict) or not config["adapters"]:
            raise JaxrsError(f"X-LoRA: {config_file} names no adapters")
        return config
    raise JaxrsError(f"X-LoRA: no adapter_config.json (or xlora_config.json) in {folder}")


def _ordered(adapters: dict, order: str | Path | None) -> dict:
    """The adapters in the ordering file's `order` (mistral.rs's ordering file), else as the config lists
    them; the classifier's outputs follow this order."""
    if order is None:
        return adapters
    try:
        names = json.loads(Path(order).read_text())["order"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise JaxrsError(f"X-LoRA: the ordering file {order} has no readable 'order' list ({e})") from None
    if sorted(names) != sorted(adapters):
        raise JaxrsError(
            f"X-LoRA: the ordering file {order} orders {names}, but the checkpoint's adapters are"
            f" {list(adapters)}"
        )
    return {name: adapters[name] for name in names}


def read_xlora(path: str | Path, order: str | Path | None = None) -> XLoraSpec:
    """An X-LoRA folder: its config (`adapter_config.json` with peft_type XLORA, or the original layout's
    `xlora_config.json`) and the classifier's weights (`xlora_classifier.safetensors`, or
    `adapter_model.safetensors`); the adapters are the config's `adapters` (the path the config gives,
    else the sub-folder of that name peft writes beside it), in the ordering file's `order` if given."""
    from safetensors.numpy import load_file

    folder = Path(path)
    config = _read_config(folder)
    pass_value = float(config.get("scaling_pass_value", 0.0))
    if pass_value != 0.0 and config.get("top_k_lora") is not None:
        # peft keeps the top k of equal dummy scalings in torch.topk's tie order, which is unspecified
        raise JaxrsError("X-LoRA: a non-zero scaling_pass_value with top_k_lora is not served")
    files = [folder / n for n in ("xlora_classifier.safetensors", "adapter_model.safetensors")]
    tensors = next((load_file(str(f)) for f in files if f.is_file()), {})
    found: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _CLASSIFIER.search(key)
        if match and "classifier" in key:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value.astype(np.float32)
    if not found:
        raise JaxrsError(f"X-LoRA: no classifier weights in {folder}")
    layers = tuple((found[i]["weight"], found[i]["bias"]) for i in sorted(found))
    adapters = tuple(
        (name, str(p) if Path(p).is_dir() else str(folder / name))
        for name, p in _ordered(config["adapters"], order).items()
    )
    keys = ("enable_softmax", "enable_softmax_topk", "softmax_temperature", "layerwise_scalings")
    keys += ("top_k_lora", "global_scaling_weight")
    options = {k: config[k] for k in keys if k in config}
    return XLoraSpec(adapters, layers, **options, scaling_pass_value=pass_value)


def classifier_scalings(spec: XLoraSpec, hidden: jax.Array, num_lora_layers: int) -> jax.Array:
    """Scalings `[rows, tokens, lora layers, adapters]` from the base model's last hidden states."""
    h = hidden.astype(jnp.float32)
    for i, (w, b) in enumerate(spec.layers):
        h = h @ jnp.asarray(w).T + jnp.asarray(b)
        if i < len(spec.layers) - 1:
            h = jax.nn.relu(h)
    n = len(spec.adapters)
    if not spec.layerwise_scalings:
        h = jnp.repeat(h[..., None, :], num_lora_layers, axis=-2)
    scalings = h.reshape(*hidden.shape[:-1], num_lora_layers, n)
    return jax.nn.softmax(scalings / spec.softmax_temperature, axis=-1) if spec.enable_softmax else scalings


def layer_weights(spec: XLoraSpec, scalings: jax.Array) -> jax.Array:
    """Each LoRA layer's adapter weights as its projection applies them: top-k, softmax over the kept
    ones if asked, times the global weight."""
    if spec.top_k_lora is not None:
        kth = jax.lax.top_k(scalings, spec.top_k_lora)[0][..., -1:]
        scalings = jnp.where(scalings >= kth, scalings, 0.0)
    if spec.enable_softmax_topk:
        kept = scalings != 0
        scalings = jnp.where(kept, jax.nn.softmax(jnp.where(kept, scalings, -jnp.inf), axis=-1), 0.0)
    return scalings * spec.global_scaling_weight


class XLoraModel:
    """A base model's parameters with the X-LoRA adapters in slots 0..n-1, run by `run`."""

    def __init__(self, cfg: ModelConfig, params: dict, spec: XLoraSpec, max_lora_rank: int = 64):
        self.cfg, self.spec = cfg, spec
        slots = LoraSlots(LoraConfig(spec.adapters, len(spec.adapters), max_lora_rank), cfg, jnp.float32)
        slots.attach(params)
        self.params = params
        self.targets: list[Target] = [t for t in MODULE_ORDER if t in slots.targets]
        self.latest_scalings: np.ndarray | None = None

    def _forward(self, params: dict, tokens: np.ndarray, length: int) -> jax.Array:
        """Final hidden states of a batch of sequences `[rows, T]` from position 0 (a scratch cache);
        tokens past `length` are padding: they write nothing, and causal attention keeps them out of
        the real ones."""
        rows, t = tokens.shape
        block = 16
        per_row = -(-t // block)
        kv = allocate_kv_cache(self.cfg, rows * per_row, block, jnp.float32)
        tables = np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t))
        slot_map = np.take_along_axis(tables, pos // block, axis=1) * block + pos % block
        slot_map = np.where(pos < length, slot_map, -1).astype(np.int32)
        meta = AttentionMetadata(pos, slot_map, tables, np.full(rows, length, np.int32))
        return _hidden(params, jnp.asarray(tokens), meta, kv, cfg=self.cfg)

    def run(self, tokens) -> np.ndarray:
        """Logits `[rows, T, vocab]` of the scaling pass then the real pass; `latest_scalings` keeps the
        classifier's output, as peft's `get_latest_scalings()` gives it. Lengths are padded to a power of
        two, so a growing sequence compiles a few shapes, not one per token."""
        tokens = np.asarray(tokens, np.int32)
        rows, t = tokens.shape
        padded = np.zeros((rows, next_power_of_2(t, 16)), np.int32)
        padded[:, :t] = tokens
        base = bind_slots(self.params, jnp.full((rows,), -1, jnp.int32))
        n_targets, num_layers = len(self.targets), self.cfg.num_layers
        hidden = self._forward(base, padded, t)
        scalings = classifier_scalings(self.spec, hidden, num_layers * n_targets)
        self.latest_scalings = np.asarray(scalings)[:, :t]
        weights = layer_weights(self.spec, scalings).reshape(*padded.shape, num_layers, n_targets, -1)
        mix = {target: jnp.moveaxis(weights[:, :, :, i], 2, 0) for i, target in enumerate(self.targets)}
        params = bind_mix(self.params, mix)
        return np.asarray(_logits(params, self._forward(params, padded, t), cfg=self.cfg))[:, :t]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _hidden(params: dict, tokens: jax.Array, meta: AttentionMetadata, kv, *, cfg: ModelConfig) -> jax.Array:
    return merge(params, cfg)(tokens, meta, kv, Kernels())[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params: dict, hidden: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    return merge(params, cfg).logits(hidden, Kernels())
