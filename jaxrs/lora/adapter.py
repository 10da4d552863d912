"""Reading a LoRA adapter in peft's format: `adapter_config.json` and `adapter_model.safetensors`
(`base_model.model.<module>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`).

The adapter's modules are matched to the model's projections through the family's checkpoint names
(Llama's `self_attn.q_proj` is the model's `attn.q_proj`, Phi's `self_attn.dense` its `attn.o_proj`), so
every family the loader reads can be adapted. `lora_alpha`, `use_rslora` (alpha / sqrt(r) instead of
alpha / r), `rank_pattern` and `alpha_pattern` set each module's scaling, which is folded into B here.
A module fused in the checkpoint (Phi-3's `qkv_proj`) adapts the projections it holds, B's rows split.
What jaxrs cannot serve (DoRA, trained biases or a lora_B bias, modules saved whole, embeddings or the
head, a vision tower, peft's variants that change the forward) is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.loading.names import LAYER_PREFIX, Experts, Rows, Source
from jaxrs.models.decoder import model_graph
from jaxrs.models.registry import family

Target = tuple[str, str]  # ("attn", "q_proj"): a projection of every layer, by its module path
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# an image tower's or projector's module, whose `layers.N` must not be taken for the text model's
_TOWER = re.compile(
    r"(?:^|\.)(?:vision_tower|vision_model|vision_embed_tokens|img_processor|multi_modal_projector|connector|perceiver\w*)\."
)
_LORA_A, _LORA_B = (re.compile(rf"\.lora_{m}\.(?:\w+\.)?weight$") for m in "AB")  # (adapter name,) weight


@dataclasses.dataclass
class LoraAdapter:
    """One adapter's weights by target: A `[layers, r, in]` and B `[layers, out, r]` (scaled), zeros in
    the layers it leaves alone."""

    name: str
    path: str
    rank: int
    weights: dict[Target, tuple[np.ndarray, np.ndarray]]
    base_model: str | None = None


_NOT_ADAPTED = {("mlp", "router")}  # the MoE router reads its weight itself, not through `layers.dense`


def _projections(cfg: ModelConfig) -> Iterator[tuple[Target, tuple[int, ...], Source]]:
    """Each adaptable projection of a layer: its module path, its stacked weight's shape and where the
    checkpoint holds it."""
    _, state = model_graph(cfg)
    table = family(cfg.architecture).names.hf(cfg)
    for group in ("attn", "mlp"):
        for proj, node in state["layers"].get(group, {}).items():
            weight = node.get("weight") if isinstance(node, dict) else None
            source = table.get(f"{LAYER_PREFIX}{group}.{proj}.weight")
            if (group, proj) not in _NOT_ADAPTED and weight is not None and source is not None:
                yield (group, proj), tuple(weight.shape), source


def adaptable_targets(cfg: ModelConfig) -> dict[str, tuple[Target, tuple[int, ...]]]:
    """The model's projections an adapter may target: the checkpoint's layer-relative module name
    (`self_attn.q_proj`; an expert stack's with `{e}`: `block_sparse_moe.experts.{e}.w1`) -> (its
    module path, its weight's (out, in), or (experts, out, in) for an expert stack)."""
    found = {}
    for target, shape, source in _projections(cfg):
        if isinstance(source, Experts) and len(shape) == 4:
            found[source.name.removesuffix(".weight")] = (target, shape[1:])
        elif isinstance(source, str | Rows) and len(shape) == 3:
            key = source if isinstance(source, str) else f"{source.name}[{source.start}:{source.stop}]"
            found[key.removesuffix(".weight")] = (target, shape[1:])
    return found


def fused_targets(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """A fused checkpoint projection (Phi-3's `self_attn.qkv_proj`, `mlp.gate_up_proj`) -> the
    `adaptable_targets` keys of the projections it holds, with their rows. A LoRA on the fused tensor is
    theirs exactly: one A, and B's rows split."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for _, shape, source in _projections(cfg):
        if isinstance(source, Rows) and len(shape) == 3:
            key = f"{source.name}[{source.start}:{source.stop}]".removesuffix(".weight")
            found.setdefault(source.name.removesuffix(".weight"), []).append((key, source.start, source.stop))
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
        (bool(config.get("lora_bias")), "has a bias on lora_B (lora_bias=True)"),
        (bool(config.get("layer_replication")), "replicates layers (layer_replication)"),
        (bool(config.get("alora_invocation_tokens")), "is an activated LoRA (alora_invocation_tokens)"),
        (bool(config.get("use_qalora")), "pools its inputs (use_qalora)"),
        (bool(config.get("use_bdlora")), "is block-diagonal (use_bdlora)"),
        (bool(config.get("arrow_config")), "routes between adapters (arrow_config)"),
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
    targets, fused = adaptable_targets(cfg), fused_targets(cfg)
    pieces: dict[Target, dict[int, list[Piece]]] = {}
    for key in sorted(tensors):
        if "xlora_classifier" in key:  # what peft writes beside an X-LoRA expert
            continue
        if not _LORA_A.search(key):
            if not _LORA_B.search(key):  # a bias, a magnitude, a module saved whole...
                raise JaxrsError(f"LoRA adapter {name!r} holds {key}, which jaxrs does not serve")
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise JaxrsError(f"LoRA adapter {name!r} has {key} but no lora_B beside it")
        if _TOWER.search(module):
            raise JaxrsError(
                f"LoRA adapter {name!r} targets {module}, in the vision tower or projector, which jaxrs does"
                " not adapt (adapt the language model only, e.g. target_modules=r'.*language_model.*')"
            )
        match = _LAYER.search(module)
        if match is None:
            _unsupported(name, module, targets)
        layer, suffix = int(match.group(1)), match.group(2)
        if layer >= cfg.num_layers:
            raise JaxrsError(f"LoRA adapter {name!r} targets {module}; the model has {cfg.num_layers} layers")
        for target, piece in _pieces(name, config, module, suffix, tensors[key], b, targets, fused):
            if piece.rank > max_rank:
                raise JaxrsError(
                    f"LoRA adapter {name!r} has rank {piece.rank} at {module}; max_lora_rank is {max_rank}"
                )
            pieces.setdefault(target, {}).setdefault(layer, []).append(piece)
    if not pieces:
        raise JaxrsError(f"LoRA adapter {name!r} at {folder} holds no LoRA weights")
    rank = max(p.rank for by_layer in pieces.values() for parts in by_layer.values() for p in parts)
    shapes = dict(targets.values())
    weights = {t: _stack(by_layer, shapes[t], cfg.num_layers, rank) for t, by_layer in pieces.items()}
    return LoraAdapter(name, str(folder), rank, weights, config.get("base_model_name_or_path"))


@dataclasses.dataclass(frozen=True)
class Piece:
    """One module's A `[r, in]` and scaled B `[out, r]`, for one expert (`expert`) or, with a leading
    expert axis, all of them (`expert` None)."""

    a: np.ndarray
    b: np.ndarray
    expert: int | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


def _unsupported(name: str, module: str, targets: dict) -> NoReturn:
    supported = ", ".join(sorted(targets))
    raise JaxrsError(
        f"LoRA adapter {name!r} targets {module}, which jaxrs does not adapt (supported: {supported})"
    )


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _mismatch(name: str, config: dict, module: str, a: np.ndarray, b: np.ndarray, ours: str) -> JaxrsError:
    base_name = config.get("base_model_name_or_path")
    theirs = f"{module} has A {list(a.shape)} and B {list(b.shape)}"
    return JaxrsError(f"LoRA adapter {name!r} (base {base_name}) does not fit this model: {theirs}; {ours}")


def _pieces(
    name: str,
    config: dict,
    module: str,
    suffix: str,
    a: np.ndarray,
    b: np.ndarray,
    targets: dict,
    fused: dict,
) -> list[tuple[Target, Piece]]:
    """The (target, piece) pairs one lora_A/lora_B pair of module `module` (layer-relative `suffix`)
    holds: a dense projection, one expert's projection (`experts.3.w1`), or transformers 5's fused
    expert parameters (peft's `target_parameters`, `experts.gate_up_proj`: gate and up share A)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    parts = fused.get(suffix)
    if parts is not None:
        if b.shape[0] != parts[-1][2]:
            raise _mismatch(name, config, module, a, b, f"the model's {suffix} has {parts[-1][2]} rows")
        return [
            pair
            for key, start, stop in parts
            for pair in _pieces(name, config, module, key, a, b[start:stop], targets, {})
        ]
    if suffix in targets:
        target, (out_features, in_features) = targets[suffix]
        r = a.shape[0]
        if a.shape[1] != in_features or b.shape != (out_features, r):
            raise _mismatch(
                name, config, module, a, b, f"the model's {suffix} is [{out_features}, {in_features}]"
            )
        return [(target, Piece(a, b * _scale(config, module, r)))]
    for pattern, (target, shape) in targets.items():
        found = re.fullmatch(re.escape(pattern).replace(r"\{e\}", r"(\d+)"), suffix)
        if found is None or "{e}" not in pattern:
            continue
        num_experts, out_features, in_features = shape
        expert, r = int(found.group(1)), a.shape[0]
        if expert >= num_experts or a.shape[1] != in_features or b.shape != (out_features, r):
            ours = f"the model's {pattern} is [{out_features}, {in_features}] for {num_experts} experts"
            raise _mismatch(name, config, module, a, b, ours)
        return [(target, Piece(a, b * _scale(config, module, r), expert))]
    if _FUSED_EXPERTS.fullmatch(suffix):
        return _fused_expert_pieces(name, config, module, a, b, targets)
    _unsupported(name, module, targets)


_FUSED_EXPERTS = re.compile(r"(?:mlp|block_sparse_moe)\.experts(?:\.base_layer)*")


def _fused_expert_pieces(
    name: str, config: dict, module: str, a: np.ndarray, b: np.ndarray, targets: dict
) -> list[tuple[Target, Piece]]:
    """peft's LoRA on a 3-D expert parameter: A `[r * experts, in]` (expert-major), B
    `[out, r * experts]` (rank-major). Which parameter (`gate_up_proj`: gate then up stacked on `out`,
    or `down_proj`) is told by the shapes: nested wrappers write both under one module name."""
    stacks = {t: shape for t, shape in targets.values() if len(shape) == 3}
    gate, up, down = (stacks.get(("mlp", p)) for p in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None:
        _unsupported(name, module, targets)
    num_experts = gate[0]
    fused = {
        "gate_up_proj": ((gate[2], gate[1] + up[1]), [("mlp", "gate_proj"), ("mlp", "up_proj")]),
        "down_proj": ((down[2], down[1]), [("mlp", "down_proj")]),
    }
    for param, ((in_features, out_features), parts) in fused.items():
        if a.shape[1] != in_features or b.shape[0] != out_features:
            continue
        if a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
            break
        r = a.shape[0] // num_experts
        where = re.sub(r"(\.base_layer)+$", "", module) + f".{param}"
        a_e = a.reshape(num_experts, r, in_features)
        b_e = b.reshape(out_features, r, num_experts).transpose(2, 0, 1) * _scale(config, where, r)
        splits = np.cumsum([stacks[t][1] for t in parts])[:-1]
        return [(t, Piece(a_e, part)) for t, part in zip(parts, np.split(b_e, splits, axis=1), strict=True)]
    ours = (
        f"its experts' gate_up_proj is [{gate[2]} -> {gate[1] + up[1]}], down_proj [{down[2]} -> {down[1]}]"
    )
    raise _mismatch(name, config, module, a, b, ours)


def _stack(by_layer: dict[int, list[Piece]], shape: tuple[int, ...], num_layers: int, rank: int):
    """A `[layers, (experts,) rank, in]` and B `[layers, (experts,) out, rank]` padded to `rank`; zeros
    for the layers (and experts) the adapter leaves out."""
    *lead, out_features, in_features = shape
    a_out = np.zeros((num_layers, *lead, rank, in_features), np.float32)
    b_out = np.zeros((num_layers, *lead, out_features, rank), np.float32)
    for layer, parts in by_layer.items():
        for p in parts:
            at = (layer,) if p.expert is None else (layer, p.expert)
            a_out[at][..., : p.rank, :] = p.a
            b_out[at][..., : p.rank] = p.b
    return a_out, b_out
