"""LLaVA 1.5 against transformers: the processor's pixels and token counts, the tower's features, and the
engine's logits and greedy tokens for image prompts (f32); the engine's image plumbing: chunked prefill
through an image, the prefix cache keyed by image content, image rows batched with text-only rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrs import LLM, SamplingParams
from jaxrs.vision.llava import LlavaProcessor
from jaxrs.vision.prompt import place_images
from tests.vision_models import IMAGE_TOKEN_ID, random_image, tiny_llava

SIZES = [(28, 28), (33, 17), (5, 200), (301, 7), (64, 63), (1, 1), (2000, 3)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    return path, tiny_llava(path)


@pytest.fixture(scope="module")
def llm(llava):
    return LLM(str(llava[0]), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8)


def hf_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pixels_and_token_counts_equal_transformers(llava, llm, mode):
    path, _ = llava
    ours = llm.model.vision.processor
    hf = hf_processor(path)
    for i, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=i, mode=mode)
        got = ours(image)
        ref = hf(text="w5 <image> w6", images=image, return_tensors="np")
        np.testing.assert_array_equal(got.pixel_values, ref["pixel_values"], err_msg=f"{w}x{h} {mode}")
        assert len(got.prompt_tokens) == int((ref["input_ids"] == IMAGE_TOKEN_ID).sum())
        assert got.feature_mask.all()


def test_content_hash_names_pixels_and_size(llm):
    proc = llm.model.vision.processor
    a, b = random_image(40, 30, seed=1), random_image(40, 30, seed=2)
    assert proc(a).content_hash == proc(a.copy()).content_hash
    assert proc(a).content_hash != proc(b).content_hash
    assert proc(a).content_hash != proc(a.resize((30, 40))).content_hash


def generate_hf(model, ids, pixels, n):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(pixels),
            max_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.log_softmax(out.scores[0][0], -1).numpy()


def run(llm, prompts, **params):
    engine = llm.engine
    reqs = [
        engine.add_request(ids, SamplingParams(temperature=0, **params), images=ip) for ids, ip in prompts
    ]
    llm._run(reqs, False)
    return [r.seqs[0] for r in reqs]


def test_logits_and_greedy_tokens_equal_transformers(llava, llm):
    path, model = llava
    proc = llm.model.vision.processor
    for i, (w, h) in enumerate([(40, 30), (17, 90)]):
        image = proc(random_image(w, h, seed=10 + i))
        ids, placed = place_images([1, 5 + i, IMAGE_TOKEN_ID, 7, 8], [IMAGE_TOKEN_ID], [image])
        (seq,) = run(llm, [(ids, placed)], max_tokens=8, logprobs=5)
        ref_tokens, ref_logprobs = generate_hf(model, ids, image.pixel_values, 8)
        assert seq.output_ids == ref_tokens
        first = seq.logprobs[0]
        for token, logprob in first.top:
            assert abs(logprob - ref_logprobs[token]) < 2e-4


def test_chunked_prefill_through_an_image_encodes_once(llava):
    path, model = llava
    llm = LLM(
        str(path),
        dtype="float32",
        kv_cache_dtype="float32",
        packed=False,
        block_size=8,
        max_num_batched_tokens=16,
    )
    vision = llm.model.vision
    image = vision.processor(random_image(50, 20, seed=3))
    ids, placed = place_images([1, 9, 10, 11, 12, 13, IMAGE_TOKEN_ID, 14, 15], [IMAGE_TOKEN_ID], [image])
    before = vision.images_encoded
    (seq,) = run(llm, [(ids, placed)], max_tokens=6)
    assert vision.images_encoded - before == 1
    assert seq.output_ids == generate_hf(model, ids, image.pixel_values, 6)[0]


def test_prefix_cache_same_image_hits_other_image_misses(llm):
    proc = llm.model.vision.processor
    a, b = proc(random_image(40, 40, seed=21)), proc(random_image(40, 40, seed=22))
    prompt = [1, 30, 31, IMAGE_TOKEN_ID, 32, 33, 34, 35, 36, 37]
    first, again, other = (place_images(prompt, [IMAGE_TOKEN_ID], [im]) for im in (a, a, b))
    (s1,) = run(llm, [first], max_tokens=4)
    (s2,) = run(llm, [again], max_tokens=4)
    (s3,) = run(llm, [other], max_tokens=4)
    assert s1.num_cached_tokens == 0
    assert s2.num_cached_tokens >= 16  # the image's blocks came from the cache
    assert s2.output_ids == s1.output_ids
    assert s3.num_cached_tokens == 0  # same tokens, other pixels: no block may be reused
    (fresh,) = run(llm, [other], max_tokens=4)  # b alone, now cached: the same tokens as computed
    assert fresh.output_ids == s3.output_ids


def test_images_batched_with_text_equal_each_alone(llm):
    proc = llm.model.vision.processor
    image_prompts = [
        place_images(
            [1, 40 + i, IMAGE_TOKEN_ID, 50 + i, 51],
            [IMAGE_TOKEN_ID],
            [proc(random_image(30 + i, 20, seed=40 + i))],
        )
        for i in range(2)
    ]
    text_prompts = [([1, 60 + i, 61, 62, 63 + i], None) for i in range(3)]
    prompts = [image_prompts[0], text_prompts[0], text_prompts[1], image_prompts[1], text_prompts[2]]
    llm.engine.blocks.prefix_caching = False
    try:
        alone = [run(llm, [p], max_tokens=6)[0].output_ids for p in prompts]
        together = [s.output_ids for s in run(llm, prompts, max_tokens=6)]
    finally:
        llm.engine.blocks.prefix_caching = True
    assert together == alone
    shapes = llm.engine.runner.shapes
    assert any(label[-1] == "images" for label in shapes) and any(label[-1] != "images" for label in shapes)


def test_two_images_in_one_prompt_equal_transformers(llava, llm):
    path, model = llava
    proc = llm.model.vision.processor
    images = [proc(random_image(30, 30, seed=70)), proc(random_image(60, 20, seed=71))]
    ids, placed = place_images([1, IMAGE_TOKEN_ID, 5, IMAGE_TOKEN_ID, 6], [IMAGE_TOKEN_ID], images)
    (seq,) = run(llm, [(ids, placed)], max_tokens=5)
    pixels = np.concatenate([im.pixel_values for im in images])
    assert seq.output_ids == generate_hf(model, ids, pixels, 5)[0]


def test_marker_count_must_match_images(llm):
    from jaxrs.errors import JaxrsError

    image = llm.model.vision.processor(random_image(10, 10))
    with pytest.raises(JaxrsError, match="2 image placeholders for 1 images"):
        place_images([IMAGE_TOKEN_ID, IMAGE_TOKEN_ID], [IMAGE_TOKEN_ID], [image])


def test_processor_reads_the_folder(llava):
    proc = LlavaProcessor.from_folder(llava[0])
    assert proc.marker == "<image>" and proc.num_tokens == 16 and proc.token_id == IMAGE_TOKEN_ID


def test_preempted_image_requests_recompute_the_same_tokens(llava):
    path, _ = llava
    small = LLM(
        str(path), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=8, kv_cache_tokens=96
    )
    proc = small.model.vision.processor
    prompts = [
        place_images(
            [1, 70 + i, IMAGE_TOKEN_ID, 80 + i],
            [IMAGE_TOKEN_ID],
            [proc(random_image(20 + i, 30, seed=90 + i))],
        )
        for i in range(4)
    ]
    small.engine.blocks.prefix_caching = False
    alone = [run(small, [p], max_tokens=10)[0].output_ids for p in prompts]
    together = [s.output_ids for s in run(small, prompts, max_tokens=10)]
    assert small.engine.scheduler.num_preemptions > 0
    assert together == alone
    assert small.engine.blocks.num_used == 0


def test_warmup_compiles_the_tower_once_per_bucket(llm):
    vision = llm.model.vision
    vision.warmup()
    shapes = vision.compile_count()
    assert shapes >= 2  # one image, two images
    vision.encode([vision.processor(random_image(90, 20))])
    assert vision.compile_count() == shapes
