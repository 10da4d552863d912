"""LLaVA-NeXT against transformers: anyres tiles and token counts for odd sizes and extreme aspect
ratios (small pinpoints), the packed features (unpadding, image_newline), and greedy tokens (f32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrs import LLM, SamplingParams
from jaxrs.vision.prompt import place_images
from tests.vision_models import IMAGE_TOKEN_ID, random_image, tiny_llava_next

SIZES = [(28, 28), (57, 13), (13, 57), (100, 31), (9, 300), (333, 5), (41, 40), (1, 1)]


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next")
    return path, tiny_llava_next(path)


@pytest.fixture(scope="module")
def llm(next_model):
    return LLM(str(next_model[0]), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8)


def test_tiles_and_token_counts_equal_transformers(next_model, llm):
    from transformers import AutoProcessor

    path, _ = next_model
    hf = AutoProcessor.from_pretrained(path)
    ours = llm.model.vision.processor
    for i, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=i)
        got = ours(image)
        ref = hf(text="w5 <image> w6", images=image, return_tensors="np")
        tiles = ref["pixel_values"][0][: len(got.pixel_values)]
        np.testing.assert_array_equal(got.pixel_values, tiles, err_msg=f"{w}x{h}")
        assert not ref["pixel_values"][0][len(got.pixel_values) :].any()  # only batch padding beyond
        assert len(got.prompt_tokens) == int((ref["input_ids"] == IMAGE_TOKEN_ID).sum()), f"{w}x{h}"


def test_features_equal_transformers(next_model, llm):
    path, model = next_model
    vision = llm.model.vision
    for i, (w, h) in enumerate([(57, 13), (9, 300), (41, 40)]):
        image = vision.processor(random_image(w, h, seed=20 + i))
        (ours,) = vision.encode([image])
        with torch.no_grad():
            out = model.model.get_image_features(
                torch.tensor(image.pixel_values)[None],
                torch.tensor([[h, w]]),
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
        ref = out.pooler_output[0].numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_greedy_tokens_equal_transformers(next_model, llm):
    path, model = next_model
    proc = llm.model.vision.processor
    w, h = 70, 23
    image = proc(random_image(w, h, seed=30))
    ids, placed = place_images([1, 5, IMAGE_TOKEN_ID, 6, 7], [IMAGE_TOKEN_ID], [image])
    request = llm.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=6), images=placed)
    llm._run([request], False)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(image.pixel_values)[None],
            image_sizes=torch.tensor([[h, w]]),
            max_new_tokens=6,
            do_sample=False,
        )
    assert request.seqs[0].output_ids == ref[0, len(ids) :].tolist()
