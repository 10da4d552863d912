"""Reading a LoRA adapter in peft's format: `adapter_config.json` and `adapter_model.safetensors`
(`base_model.model.<module>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`).

The adapter's modules are matched to the model's projections through the family's checkpoint names
(Llama's `self_attn.q_proj` is the model's `attn.q_proj`, Phi's `self_attn.dense` its `attn.o_proj`), so
every family the loader reads can be adapted. `lora_alpha`, `use_rslora` (alpha / sqrt(r) instead of
alpha / r), `rank_pattern` and `alpha_pattern` set each module's scaling, which is folded into B here.
What jaxrs cannot serve (DoRA, trained biases, modules saved whole, embeddings or the head, a fused
checkpoint tensor) is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.loading.names import LAYER_PREFIX
from jaxrs.models.decoder import model_graph
from jaxrs.models.registry import family

Target = tuple[str, str]  # ("attn", "q_proj"): a projection of every layer, by its module path
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class LoraAdapter:
    """One adapter's weights by target: A `[layers, r, in]` and B `[layers, out, r]` (scaled), zeros in
    the layers it leaves alone."""

    name: str
    path: str
    rank: int
    weights: dict[Target, tuple[np.ndarray, np.ndarray]]
    base_model: str | None = None


def adaptable_targets(cfg: ModelConfig) -> dict[str, tuple[Target, tuple[int, int]]]:
    """The model's projections an adapter may target: the checkpoint's layer-relative module name
    (`self_attn.q_proj`) -> (its module path, its weight's (out, in))."""
    _, state = model_graph(cfg)
    table = family(cfg.architecture).names.hf(cfg)
    found = {}
    for group in ("attn", "mlp"):
        for proj, node in state["layers"].get(group, {}).items():
            weight = node.get("weight") if isinstance(node, dict) else None
            source = table.get(f"{LAYER_PREFIX}{group}.{proj}.weight")
            if weight is None or len(weight.shape) != 3 or not isinstance(source, str):
                continue  # an expert stack or a fused checkpoint tensor
            found[source.removesuffix(".weight")] = ((group, proj), tuple(weight.shape[1:]))
    return found


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """peft's per-module override: the first pattern matching the module name's tail."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _check_config(config: dict, name: str) -> None:
    kind = config.get("peft_type", "LORA")
    problems = [
        (kind != "LORA", f"is a {kind} adapter, not LORA"),
        (bool(config.get("use_dora")), "uses DoRA"),
        (config.get("bias", "none") != "none", f"trains biases (bias={config.get('bias')!r})"),
        (bool(config.get("modules_to_save")), f"saves modules whole ({config.get('modules_to_save')})"),
        (bool(config.get("fan_in_fan_out")), "stores fan_in_fan_out weights"),
    ]
    for bad, what in problems:
        if bad:
            raise JaxrsError(f"LoRA adapter {name!r} {what}, which jaxrs does not serve")


def read_adapter(name: str, path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraAdapter:
    """The adapter at `path` (a peft output folder) matched to the model `cfg`; its rank must be at most
    `max_rank`."""
    folder = Path(path)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise JaxrsError(f"LoRA adapter {name!r}: no {f.name} in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise JaxrsError(f"LoRA adapter {name!r}: {config_file} is not JSON ({e})") from None
    _check_config(config, name)
    from safetensors.numpy import load_file

    tensors = load_file(str(weights_file))
    targets = adaptable_targets(cfg)
    num_layers = cfg.num_layers
    weights: dict[Target, tuple[np.ndarray, np.ndarray]] = {}
    rank = 0
    for key in sorted(tensors):
        if "xlora_classifier" in key:  # what peft writes beside an X-LoRA expert
            continue
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise JaxrsError(f"LoRA adapter {name!r} holds {key}, which jaxrs does not serve")
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        match = _LAYER.search(module)
        if match is None or match.group(2) not in targets:
            supported = ", ".join(sorted(targets))
            raise JaxrsError(
                f"LoRA adapter {name!r} targets {module}, which jaxrs does not adapt (supported: {supported})"
            )
        layer, suffix = int(match.group(1)), match.group(2)
        target, (out_features, in_features) = targets[suffix]
        a = tensors[key].astype(np.float32)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise JaxrsError(f"LoRA adapter {name!r} has {key} but no lora_B beside it")
        r = a.shape[0]
        if layer >= num_layers or a.shape[1] != in_features or b.shape != (out_features, r):
            base_name = config.get("base_model_name_or_path")
            theirs = f"{module} has A {list(a.shape)} and B {list(b.shape)}"
            ours = f"the model's {suffix} is [{out_features}, {in_features}] in {num_layers} layers"
            raise JaxrsError(
                f"LoRA adapter {name!r} (base {base_name}) does not fit this model: {theirs}; {ours}"
            )
        if r > max_rank:
            raise JaxrsError(f"LoRA adapter {name!r} has rank {r} at {module}; max_lora_rank is {max_rank}")
        rank = max(rank, r)
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        if target not in weights:
            weights[target] = ([None] * num_layers, [None] * num_layers)
        weights[target][0][layer] = a
        weights[target][1][layer] = b.astype(np.float32) * scale
    if not weights:
        raise JaxrsError(f"LoRA adapter {name!r} at {folder} holds no LoRA weights")
    return LoraAdapter(
        name,
        str(folder),
        rank,
        {t: _stack(a_list, b_list, rank) for t, (a_list, b_list) in weights.items()},
        config.get("base_model_name_or_path"),
    )


def _stack(a_list: list, b_list: list, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer A and B padded to `rank` and stacked; zeros for the layers the adapter leaves out."""
    shape_a = next(a for a in a_list if a is not None).shape[1]
    shape_b = next(b for b in b_list if b is not None).shape[0]
    a_out = np.zeros((len(a_list), rank, shape_a), np.float32)
    b_out = np.zeros((len(b_list), shape_b, rank), np.float32)
    for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        if a is not None:
            a_out[i, : a.shape[0]] = a
            b_out[i, :, : b.shape[1]] = b
    return a_out, b_out
