"""What the engine is told about X-LoRA (without importing JAX: the CLI and the engine options read it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxrs.errors import JaxrsError

DEFAULT_NAME = "xlora"


@dataclasses.dataclass(frozen=True)
class XLoraOptions:
    """path: the X-LoRA folder (peft's or the original xlora layout). order: mistral.rs's ordering file
    (its `order` list orders the experts). tgt_non_granular_index: freeze each sequence's scalings after
    this many generated tokens (None: never). name: what requests call it."""

    path: str
    order: str | None = None
    tgt_non_granular_index: int | None = None
    name: str = DEFAULT_NAME

    def __post_init__(self) -> None:
        if self.tgt_non_granular_index is not None and self.tgt_non_granular_index < 0:
            raise JaxrsError("tgt_non_granular_index must be at least 0")
        if not Path(self.path).is_dir():
            raise JaxrsError(f"X-LoRA: {self.path} is not a folder")


def xlora_options(options: dict) -> dict:
    """Engine options with the Python API's X-LoRA keywords (`xlora=PATH`, `xlora_order=FILE`,
    `tgt_non_granular_index=K`, `xlora_name`) folded into one `xlora` XLoraOptions."""
    options = dict(options)
    path = options.pop("xlora", None)
    keys = ("xlora_order", "tgt_non_granular_index", "xlora_name")
    given = {k: options.pop(k) for k in keys if k in options}
    if isinstance(path, XLoraOptions):
        options["xlora"] = path
    elif path is not None:
        options["xlora"] = XLoraOptions(
            str(path),
            None if given.get("xlora_order") is None else str(given["xlora_order"]),
            given.get("tgt_non_granular_index"),
            given.get("xlora_name") or DEFAULT_NAME,
        )
    elif any(v is not None for v in given.values()):
        raise JaxrsError(f"{', '.join(k for k, v in given.items() if v is not None)} given without xlora")
    return options
