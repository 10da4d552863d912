"""A Hugging Face model folder: config.json plus single or sharded safetensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxrs.config import ModelConfig, read_json
from jaxrs.errors import ModelLoadError
from jaxrs.loading.model_config import config_from_hf
from jaxrs.loading.safetensors_file import SafetensorsFile


def load_hf_config(folder: Path) -> ModelConfig:
    return config_from_hf(read_json(folder / "config.json"), folder / "config.json")


def open_hf_tensors(folder: Path, needed: list[str]) -> Callable[[str], np.ndarray]:
    """A getter of HF-named tensors over the folder's shards; fails up front if any needed one is missing."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = read_json(index_path).get("weight_map", {})
        files = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
        where = {name: files[shard] for name, shard in weight_map.items()}
        described = index_path
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(folder, "no *.safetensors weights in this model folder")
        where = {}
        for shard in shards:
            st = SafetensorsFile(shard)
            where.update(dict.fromkeys(st.names, st))
        described = shards[0] if len(shards) == 1 else folder
    missing = [name for name in needed if name not in where]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(described, f"missing tensor(s) {', '.join(missing[:3])}{more}")

    return lambda name: where[name].get(name)
