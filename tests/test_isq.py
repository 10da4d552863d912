"""Quantized weights in the model: GGUF tensors kept packed, and in-situ quantization while loading."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from jaxrs.errors import JaxrsError
from jaxrs.loading import load_model
from jaxrs.quant import QuantizedTensor, dequantize
from tests.conftest import relative_error, save_tiny_hf_model, save_tiny_tokenizer
from tests.paged import PagedRun

TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-isq")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return folder


def logits(loaded, ids):
    return PagedRun(loaded.config, loaded.params, num_blocks=16).feed(ids)


def dequantized(params):
    """The same tree with every packed weight replaced by its float value."""
    return jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QuantizedTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


@pytest.fixture(scope="module")
def reference_logits(tiny):
    return logits(load_model(str(tiny)), IDS)


IDS = list(range(3, 40))
ERRORS = {}


@pytest.mark.parametrize("fmt", ["8", "Q4K", "hqq4"])
def test_isq_packs_matrices_and_matmuls_read_them_exactly(tiny, reference_logits, fmt):
    packed = load_model(str(tiny), isq=fmt)
    layers = packed.params["layers"]
    assert all(isinstance(layers[k], QuantizedTensor) for k in ("q_proj", "k_proj", "o_proj", "down_proj"))
    assert not isinstance(layers["input_norm"], QuantizedTensor)  # norms stay float
    assert not isinstance(packed.params["embed"], QuantizedTensor)  # embeddings stay float by default
    ours = logits(packed, IDS)
    unpacked = PagedRun(packed.config, dequantized(packed.params), num_blocks=16).feed(IDS)
    np.testing.assert_allclose(ours, unpacked, rtol=0, atol=1e-5 * np.abs(unpacked).max())
    ERRORS[fmt] = relative_error(ours, reference_logits)
    print(f"ISQ {fmt}: max relative logit error against float weights {ERRORS[fmt]:.3g}")
    assert ERRORS[fmt] > 0


def test_more_bits_give_smaller_error():
    if len(ERRORS) < 3:
        pytest.skip("needs the ISQ runs above")
    assert ERRORS["8"] < ERRORS["Q4K"] and ERRORS["8"] < ERRORS["hqq4"]


def test_unknown_isq_type_is_rejected_with_the_valid_names(tiny):
    with pytest.raises(JaxrsError, match="Q4_K") as info:
        load_model(str(tiny), isq="Q4_X")
    assert "Q4_X" in str(info.value)


@pytest.mark.slow
def test_packed_gguf_equals_dequantized_load(demo_gguf):
    plain = load_model(str(demo_gguf))
    packed = load_model(str(demo_gguf), packed=True)
    assert packed.params["layers"]["q_proj"].fmt == "Q4_1" and packed.params["embed"].fmt == "Q8_0"
    ids = list(range(100, 124))
    np.testing.assert_array_equal(logits(packed, ids), logits(plain, ids))
