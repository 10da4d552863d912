"""The shared decoder's parameter transforms: fused projections give the unfused logits."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Qwen2Config

from jaxrs.loading import load_model
from jaxrs.models.decoder import fuse_projections
from jaxrs.quant import QuantizedTensor
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer
from tests.paged import PagedRun

# q/k/v biases (Qwen2), GQA, an odd head count
QWEN2 = Qwen2Config(
    vocab_size=128,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
IDS = list(range(5, 45))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-fuse")
    save_tiny_hf_model(QWEN2, folder)
    save_tiny_tokenizer(folder, QWEN2.vocab_size)
    return folder


def logits(cfg, params):
    return PagedRun(cfg, params, num_blocks=8).feed(IDS)


@pytest.mark.parametrize("drop_bias", [None, "k_proj_bias"])
def test_fused_projections_give_the_unfused_logits(qwen2, drop_bias):
    loaded = load_model(str(qwen2))
    cfg, params = loaded.config, loaded.params
    if drop_bias:  # a group where only some projections have a bias: the others get zeros
        params["layers"].pop(drop_bias)
    fused = fuse_projections(params)
    layers = fused["layers"]
    assert {"qkv_proj", "qkv_proj_bias", "gate_up_proj"} <= set(layers)
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_proj_bias"} & set(layers)
    assert layers["qkv_proj"].shape == (2, cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    np.testing.assert_allclose(logits(cfg, fused), logits(cfg, params), rtol=0, atol=2e-5)
    assert fuse_projections(fused)["layers"].keys() == layers.keys()  # idempotent


def test_packed_projections_stay_apart(qwen2):
    packed = load_model(str(qwen2), isq="Q8_0")
    layers = fuse_projections(packed.params)["layers"]
    assert isinstance(layers["q_proj"], QuantizedTensor) and "qkv_proj" not in layers
