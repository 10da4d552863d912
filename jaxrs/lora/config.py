"""What the engine serves in the way of adapters: the adapters to load at start, how many fit at once,
their largest rank, and whether adapters may be loaded while serving."""

from __future__ import annotations

import dataclasses

from jaxrs.errors import JaxrsError


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """adapters: (name, path) pairs loaded at start. max_loras: slots, adapters loaded at once.
    max_lora_rank: the largest rank a slot holds (the stacks are padded to it, rounded up to a power of
    two). runtime: adapters may be loaded and unloaded while serving; then every projection the model
    has is adapted, since a later adapter may target any of them (else only the start adapters' targets)."""

    adapters: tuple[tuple[str, str], ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    runtime: bool = False

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise JaxrsError("max_loras must be at least 1")
        if self.max_lora_rank < 1:
            raise JaxrsError("max_lora_rank must be at least 1")
        names = [name for name, _ in self.adapters]
        if len(set(names)) != len(names):
            raise JaxrsError(f"LoRA adapter names must be unique (got {', '.join(names)})")
        if len(names) > self.max_loras:
            raise JaxrsError(f"{len(names)} LoRA adapters given but max_loras is {self.max_loras}")


def parse_lora_arg(text: str) -> tuple[str, str]:
    """`NAME=PATH` (the command line's `--lora`, vLLM's `--lora-modules`)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise JaxrsError(f"a LoRA adapter is given as NAME=PATH, not {text!r}")
    return name, path


def lora_options(options: dict) -> dict:
    """Engine options with the Python API's LoRA keywords (`lora_adapters={name: path}`, `max_loras`,
    `max_lora_rank`, `enable_runtime_lora`) folded into one `lora` LoraConfig; unchanged without them."""
    options = dict(options)
    adapters = options.pop("lora_adapters", None) or {}
    keys = {"max_loras": "max_loras", "max_lora_rank": "max_lora_rank", "enable_runtime_lora": "runtime"}
    given = {field: options.pop(key) for key, field in keys.items() if options.get(key) is not None}
    for key in keys:
        options.pop(key, None)
    if adapters or given:
        options["lora"] = LoraConfig(tuple((str(n), str(p)) for n, p in dict(adapters).items()), **given)
    return options
