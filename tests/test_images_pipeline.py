"""The whole FLUX pipeline against diffusers' `FluxPipeline` from the same initial latents and prompt
embeddings (tiny random schnell and dev pipelines, f32), the sampler's noise levels against
`FlowMatchEulerDiscreteScheduler`, and the `ImageModel` API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrs.images.flow_match import SchedulerConfig, sigmas
from jaxrs.images.loading import load_pipeline
from jaxrs.images.pipeline import pack
from tests.flux_tiny import save_pipeline, scheduler_config, tiny_transformer, tiny_vae


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
@pytest.mark.parametrize("seq_len", [4, 1024, 4096])
def test_sigmas_match_diffusers(dev, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    raw = scheduler_config(dev)
    ref = FlowMatchEulerDiscreteScheduler.from_config(raw)
    steps = 7
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    np.testing.assert_array_equal(sigmas(steps, seq_len, SchedulerConfig.from_dict(raw)), ref.sigmas.numpy())


@pytest.mark.parametrize("dev", [False, True], ids=["schnell", "dev"])
def test_pipeline_matches_diffusers(dev, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    folder = save_pipeline(tmp_path, dev)
    ours = load_pipeline(folder)
    height, width, steps, guidance = 64, 48, 3, 4.0
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, 4, height // 8, width // 8), dtype=np.float32)
    txt = rng.standard_normal((2, 6, 32), dtype=np.float32)
    pooled = rng.standard_normal((2, 24), dtype=np.float32)

    ref = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(dev)),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_transformer(dev),
    )
    with torch.no_grad():
        images = ref(
            prompt_embeds=torch.tensor(txt),
            pooled_prompt_embeds=torch.tensor(pooled),
            latents=torch.tensor(np.asarray(pack(latents))),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        ).images
    expected = np.round(np.asarray(images) * 255)

    tokens = ours.denoise(latents, txt, pooled, steps, guidance)
    got = ours.decode(tokens, height // 8, width // 8)
    assert got.shape == (2, height, width, 3)
    assert np.abs(got.astype(np.float64) - expected).max() <= 1  # <= 1/255
    assert got.std() > 5  # a real picture, not a constant


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    from jaxrs.images import ImageLimits, ImageModel

    folder = save_pipeline(tmp_path_factory.mktemp("flux"), dev=False)
    return ImageModel(folder, limits=ImageLimits(min_side=32, max_side=128, max_images=3))


def test_image_model_generate(image_model):
    steps = []
    record = lambda step, total: steps.append(step)
    images = image_model.generate("a red cat", n=2, size="64x32", seed=11, on_step=record)
    assert [im.size for im in images] == [(64, 32)] * 2
    assert steps == [1, 2, 3, 4]  # schnell: 4 steps
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[0]))
    again = image_model.generate("a red cat", n=2, size="64x32", seed=11)  # the same compiled shapes
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(images[0]))


def test_auto_size_is_the_largest_square_up_to_1024():
    from jaxrs.images.image_model import ImageLimits, parse_size

    assert parse_size("auto", ImageLimits()) == (1024, 1024)
    assert parse_size("AUTO", ImageLimits(min_side=32, max_side=120)) == (112, 112)
    assert parse_size("32X48", ImageLimits(min_side=32, max_side=128)) == (32, 48)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": "65x32"}, "size"),
        ({"size": "256x32"}, "size"),
        ({"size": "big"}, "size"),
        ({"n": 4}, "n must"),
        ({"n": 0}, "n must"),
        ({"prompt": "  "}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
    ],
)
def test_image_model_rejects(image_model, kwargs, field):
    from jaxrs.images import ImageRequestError

    args = {"prompt": "a cat", "size": "32x32", **kwargs}
    with pytest.raises(ImageRequestError, match=field):
        image_model.generate(args.pop("prompt"), **args)
