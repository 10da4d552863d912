"""`ModelConfig` <-> a JSON-ready dict, exactly: a saved model reloads with an equal (same-hash) config.

JSON has no tuples and no nested dataclasses, so lists come back as tuples and objects as the field's
dataclass (`RopeScaling`); every `ModelConfig` field is a scalar, a tuple or such a dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from jaxrs.config import ModelConfig


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (NumPy scalars from GGUF metadata made Python ones)."""
    return _plain(dataclasses.asdict(cfg))


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; a ValueError names fields this version does not know or lacks."""
    return _build(ModelConfig, data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _build(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {', '.join(unknown)}")
    try:
        return cls(**{name: _value(value, hints[name]) for name, value in data.items()})
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{cls.__name__}: {e}") from None


def _value(value: Any, hint: Any) -> Any:
    if isinstance(value, dict):
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            raise ValueError(f"unexpected object for a field of type {hint}")
        return _build(hint, value)
    if isinstance(value, list):
        return tuple(_value(v, None) for v in value)
    return value
