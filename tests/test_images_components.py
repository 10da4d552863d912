"""Each FLUX component against its diffusers / transformers reference (tiny random configs, f32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrs.images.loading import load_pipeline
from tests.flux_tiny import save_pipeline, tiny_clip, tiny_t5, tiny_transformer, tiny_vae


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A dev pipeline (the transformer with its guidance embedding; schnell's, without one, is checked
    through the whole pipeline in test_images_pipeline)."""
    return save_pipeline(tmp_path_factory.mktemp("flux"), dev=True), True


@pytest.fixture(scope="module")
def pipe(pipeline_folder):
    return load_pipeline(pipeline_folder[0])


def test_clip_pooled_and_hidden(pipe):
    tokens = np.array([[3, 5, 9, 12, 4, 4, 4, 4], [3, 7, 4, 4, 4, 4, 4, 4]])
    with torch.no_grad():
        ref = tiny_clip()(torch.tensor(tokens))
    hidden, pooled = pipe.clip.module()(tokens)
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=2e-5, rtol=1e-4)


def test_t5_encoder(pipe):
    tokens = np.array([[5, 9, 12, 1, 0, 0, 0, 0, 0, 0, 0, 0], [7, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = tiny_t5()(torch.tensor(tokens)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(pipe.t5.module()(tokens)), ref, atol=2e-5, rtol=1e-4)


def test_transformer_one_step(pipe, pipeline_folder):
    """Velocity for packed latents of a non-square 4x2-patch image, text ids zero, guidance for dev."""
    from jaxrs.images.flux_transformer import rope_tables
    from jaxrs.images.pipeline import position_ids

    dev = pipeline_folder[1]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 16), dtype=np.float32)
    txt = rng.standard_normal((2, 5, 32), dtype=np.float32)
    pooled = rng.standard_normal((2, 24), dtype=np.float32)
    t = np.array([0.7, 0.3], np.float32)
    guidance = np.array([3.5, 2.0], np.float32) if dev else None
    ids = position_ids(5, 8, 4)
    with torch.no_grad():
        ref = tiny_transformer(dev)(
            hidden_states=torch.tensor(latents),
            encoder_hidden_states=torch.tensor(txt),
            pooled_projections=torch.tensor(pooled),
            timestep=torch.tensor(t),
            img_ids=torch.tensor(ids[5:]),
            txt_ids=torch.tensor(ids[:5]),
            guidance=None if guidance is None else torch.tensor(guidance),
            return_dict=False,
        )[0].numpy()
    cos, sin = rope_tables(ids, (4, 6, 6))
    out = pipe.transformer.module()(latents, txt, pooled, t, guidance, cos, sin)
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5, rtol=1e-4)


def test_vae_decoder(pipe):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 6, 4), dtype=np.float32)
    vae = tiny_vae()
    with torch.no_grad():
        z = torch.tensor(latents) / vae.config.scaling_factor + vae.config.shift_factor
        ref = vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(pipe.vae.module()(latents))
    assert out.shape == (2, 48, 32, 3)
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=1e-4)
