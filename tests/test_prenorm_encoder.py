"""The shared pre-LN encoder layer: transformers' parameter names (the loaders rely on them), a bias that
hides padding keys and future positions, and the activations by transformers' names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrs.models.prenorm_encoder import PreNormLayer, encoder_activation

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden_size: int = 16
    intermediate_size: int = 24
    num_heads: int = 4
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


def random_layer(seed: int = 0) -> PreNormLayer:
    layer = PreNormLayer(Shape())
    rng = np.random.default_rng(seed)
    state = nnx.state(layer, nnx.Param)
    nnx.update(layer, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32), state))
    return layer


def test_parameter_paths_are_transformers_names():
    paths = {".".join(map(str, p)) for p, _ in nnx.state(PreNormLayer(Shape())).flat_state()}
    projections = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    modules = ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", *projections]
    assert paths == {f"{m}.{kind}" for m in modules for kind in ("weight", "bias")}


def test_padding_keys_are_hidden_by_the_bias():
    layer = random_layer()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 16)), jnp.float32)
    key_bias = jnp.asarray([[0.0, 0.0, 0.0, NEG_INF, NEG_INF]])[:, None, None, :]
    padded = layer(x, key_bias)
    alone = layer(x[:, :3])
    np.testing.assert_allclose(padded[:, :3], alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(layer(x)[:, :3], alone, atol=1e-3)  # without the bias the padding counts


def test_causal_bias_keeps_later_tokens_out():
    layer = random_layer(2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 16)), jnp.float32)
    causal = jnp.where(jnp.arange(4)[:, None] >= jnp.arange(4)[None, :], 0.0, NEG_INF)
    changed = x.at[:, 2:].set(0.0)
    np.testing.assert_allclose(layer(x, causal)[:, :2], layer(changed, causal)[:, :2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quick_gelu", lambda x: x * jax.nn.sigmoid(1.702 * x)),
        ("gelu", lambda x: jax.nn.gelu(x, approximate=False)),
        ("gelu_pytorch_tanh", lambda x: jax.nn.gelu(x, approximate=True)),
        ("gelu_fast", lambda x: jax.nn.gelu(x, approximate=True)),
        ("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True)),
    ],
)
def test_activation_by_transformers_name(name, expected):
    x = jnp.linspace(-4, 4, 33)
    np.testing.assert_allclose(encoder_activation(x, name), expected(x), rtol=1e-6, atol=1e-6)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="relu6"):
        encoder_activation(jnp.ones(2), "relu6")
