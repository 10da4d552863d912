"""SigLIP's variable-size position ids and patch mask against transformers' Idefics2VisionEmbeddings
(the module itself, reading the ids back through an identity position table), for the real 70-per-side
grid and small ones, over many real/padded patch counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrs.vision.siglip import _bucket_boundaries, hf_activation, patch_mask, position_ids

transformers = pytest.importorskip("transformers")


def _reference_ids(per_side: int, mask: np.ndarray) -> np.ndarray:
    """transformers' position ids for a `[B, rows, cols]` patch mask: a 1-wide embedding whose position
    table is `arange` and whose patch convolution is zero, so each output is its position id."""
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    cfg = Idefics2VisionConfig(hidden_size=1, patch_size=1, image_size=per_side, num_channels=1)
    emb = Idefics2VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(per_side**2, dtype=torch.float32)[:, None])
        b, rows, cols = mask.shape
        out = emb(torch.zeros(b, 1, rows, cols), torch.from_numpy(mask))
    return out[..., 0].numpy().astype(np.int64)


@pytest.mark.parametrize("per_side", [3, 7, 70])
def test_position_ids_match_transformers(per_side):
    rng = np.random.default_rng(per_side)
    rows, cols = per_side + 3, per_side + 1
    masks = []
    for _ in range(24):
        mask = np.zeros((rows, cols), bool)
        mask[: rng.integers(1, rows + 1), : rng.integers(1, cols + 1)] = True
        masks.append(mask)
    masks.append(np.ones((rows, cols), bool))
    mask = np.stack(masks)
    ours = np.asarray(jax.jit(position_ids, static_argnums=1)(jnp.asarray(mask), per_side))
    np.testing.assert_array_equal(ours, _reference_ids(per_side, mask))


@pytest.mark.parametrize("per_side", [2, 3, 6, 7, 10, 64, 70])
def test_bucket_boundaries_match_torch_arange(per_side):
    ref = torch.arange(1 / per_side, 1.0, 1 / per_side).numpy()
    np.testing.assert_array_equal(_bucket_boundaries(per_side), ref)


def test_patch_mask_needs_every_pixel():
    pixels = np.zeros((1, 20, 17), bool)
    pixels[0, :13, :16] = True  # rows 0-7 full, 8-15 partly; cols 0-15 full, the 17th pixel never counts
    got = np.asarray(patch_mask(jnp.asarray(pixels), 8))
    np.testing.assert_array_equal(got, [[[True, True], [False, False]]])


def test_unknown_activation_is_named():
    assert hf_activation("gelu_pytorch_tanh") == "gelu_tanh"
    with pytest.raises(ValueError, match="quick_gelu"):
        hf_activation("quick_gelu")
