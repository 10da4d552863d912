"""Filling a tower's parameters from safetensors by dotted path: stacked layers read one by one, a
convolution reshaped into its matrix, and a wrong shape or a missing tensor named."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxrs.errors import ModelLoadError
from jaxrs.models.nn import Linear
from jaxrs.vision.tower_weights import load_tower_params


class Tiny(nnx.Module):
    def __init__(self):
        self.patch = Linear(12, 4, bias=True)  # stored as a [4, 3, 2, 2] convolution
        self.layers = nnx.vmap(lambda _: Linear(4, 4), in_axes=0, out_axes=0)(jnp.arange(2))


def rename(path: str) -> str:
    return f"m.blocks.{{i}}.{path.removeprefix('layers.')}" if path.startswith("layers.") else f"m.{path}"


def test_stacks_layers_and_reshapes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "m.patch.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
        "m.patch.bias": rng.normal(size=4).astype(np.float16),
        "m.blocks.0.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "m.blocks.1.weight": rng.normal(size=(4, 4)).astype(np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    params = load_tower_params(tmp_path, nnx.eval_shape(Tiny), rename)
    np.testing.assert_array_equal(params["patch"]["weight"], tensors["m.patch.weight"].reshape(4, 12))
    assert params["patch"]["bias"].dtype == np.float32
    np.testing.assert_array_equal(params["layers"]["weight"][1], tensors["m.blocks.1.weight"])


def test_wrong_shape_and_missing_are_named(tmp_path):
    tensors = {
        "m.patch.weight": np.zeros((4, 13), np.float32),
        "m.patch.bias": np.zeros(4, np.float32),
        "m.blocks.0.weight": np.zeros((4, 4), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="m.blocks.1.weight"):
        load_tower_params(tmp_path, nnx.eval_shape(Tiny), rename)
    tensors["m.blocks.1.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"m.patch.weight.*\[4, 13\].*\[4, 12\]"):
        load_tower_params(tmp_path, nnx.eval_shape(Tiny), rename)
