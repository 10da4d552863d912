"""Checkpoint tensors -> the model's state: the names read follow the module tree, a tensor of the wrong
shape or a missing parameter is an error naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import LlamaConfig, Qwen2Config

from jaxrs.errors import JaxrsError
from jaxrs.loading.checkpoint import check_params, hf_weight_names, load_params, parameter_shapes
from jaxrs.loading.model_config import config_from_hf
from jaxrs.models.registry import family

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def config(raw) -> object:
    return config_from_hf(raw.to_dict(), Path("config.json"))


def zeros_getter(cfg, wrong: str | None = None):
    """A getter of zero tensors in each HF tensor's shape (the shape of the parameter it fills); `wrong`
    gets one row too many."""
    shapes = {}
    for path, source in family(cfg.architecture).names.hf(cfg).items():
        if path not in parameter_shapes(cfg):
            continue
        if path.startswith("layers."):
            for i in range(cfg.num_layers):
                shapes[f"model.layers.{i}.{source}"] = parameter_shapes(cfg)[path][1:]
        else:
            shapes[source] = parameter_shapes(cfg)[path]

    def get(name: str) -> np.ndarray:
        shape = shapes[name]
        return np.zeros((shape[0] + (name == wrong), *shape[1:]), np.float32)

    return get


def test_names_follow_the_module_tree():
    tied = config(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    names = hf_weight_names(tied)
    assert "lm_head.weight" not in names  # tied: no head of its own
    assert "model.layers.1.self_attn.q_proj.bias" in names  # Qwen2's q/k/v biases
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    plain = config(LlamaConfig(**SMALL, num_key_value_heads=2))
    assert "lm_head.weight" in hf_weight_names(plain)
    assert not any(n.endswith(".bias") for n in hf_weight_names(plain))


def test_a_tensor_of_the_wrong_shape_names_both_shapes():
    cfg = config(LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    state = load_params(zeros_getter(cfg), cfg, np.float32)
    check_params(state, cfg)
    with pytest.raises(
        JaxrsError,
        match=r"layers\.attn\.k_proj\.weight \(layer 1: self_attn\.k_proj\.weight\): checkpoint shape "
        r"\(17, 32\), the config needs \(16, 32\)",
    ):
        load_params(zeros_getter(cfg, wrong="model.layers.1.self_attn.k_proj.weight"), cfg, np.float32)


def test_check_params_names_a_missing_or_extra_parameter():
    cfg = config(LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    state = load_params(zeros_getter(cfg), cfg, np.float32)
    del state["layers"]["attn"]["v_proj"]
    with pytest.raises(JaxrsError, match=r"parameter layers\.attn\.v_proj\.weight is missing"):
        check_params(state, cfg)
    state = load_params(zeros_getter(cfg), cfg, np.float32)
    state["layers"]["attn"]["q_norm"] = {"weight": np.zeros((2, 8), np.float32)}
    with pytest.raises(JaxrsError, match=r"unexpected parameter\(s\) layers\.attn\.q_norm\.weight"):
        check_params(state, cfg)
