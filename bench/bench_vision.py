"""Image encode time per image (LLaVA 1.5) and per tile (LLaVA-NeXT), and time to first token of a
one-image chat, on random-weight LLaVA models built offline with transformers.

    python bench/bench_vision.py [--size tiny|clip-l-336] [--passes 5]

`tiny`: a 3-layer 32-wide CLIP on 28 px images (16 image tokens) before a 2-layer Llama. `clip-l-336`:
CLIP ViT-L/14 at 336 px (24 layers, 1024 wide; the tower runs 23 layers, 576 image tokens) with LLaVA's
projector into a 2-layer 1024-wide Llama, so TTFT is the tower plus a 600-token prefill of that small text
model. Medians after a warm-up: the tower's buckets and a first chat (its step shapes) compile first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrs import LLM, SamplingParams  # noqa: E402
from tests.vision_models import PINPOINTS, random_image, save_image_tokenizer  # noqa: E402

SIZES = {
    "tiny": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
        ),
        text_hidden=64,
        pinpoints=PINPOINTS,
    ),
    "clip-l-336": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_hidden=1024,
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    ),
}


def build(path: Path, size: str, kind: str) -> None:
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
    )

    spec = SIZES[size]
    side, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    vc = CLIPVisionConfig(**spec["vision"])
    h = spec["text_hidden"]
    tc = LlamaConfig(
        vocab_size=256,
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=2,
        num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 128),
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=8192,
    )
    images = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    torch.manual_seed(0)
    if kind == "llava":
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vc, text_config=tc, image_token_id=255)
        )
        CLIPImageProcessorPil(**images).save_pretrained(path)
    else:
        cfg = LlavaNextConfig(
            vision_config=vc, text_config=tc, image_token_index=255, image_grid_pinpoints=spec["pinpoints"]
        )
        model = LlavaNextForConditionalGeneration(cfg)
        LlavaNextImageProcessorPil(**images, image_grid_pinpoints=spec["pinpoints"]).save_pretrained(path)
    model.to(torch.float32).save_pretrained(path)
    proc = {
        "patch_size": patch,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    (path / "processor_config.json").write_text(json.dumps(proc))
    save_image_tokenizer(path)


def measure(path: Path, passes: int) -> dict:
    llm = LLM(str(path), dtype="float32", prefix_caching=False, max_model_len=4096, kv_cache_tokens=8192)
    vision = llm.model.vision
    vision.warmup()
    side = vision.processor.warmup_sizes[0]
    image = vision.processor(random_image(side[0] + 37, side[1] - 11, seed=1))
    tiles = len(image.pixel_values)
    vision.encode([image])  # the shape of this image (a NeXT index bucket) compiles here
    encode = []
    for _ in range(passes):
        began = time.perf_counter()
        vision.encode([image])
        encode.append(time.perf_counter() - began)
    params = SamplingParams(temperature=0, max_tokens=1)
    ttft = []
    for i in range(passes + 1):
        picture = random_image(side[0] + 37, side[1] - 11, seed=10 + i)
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": picture}, {"type": "text", "text": "w5 w6 w7"}],
            }
        ]
        began = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0]
        if i:  # the first pass compiles the image prefill shapes
            ttft.append(time.perf_counter() - began)
    encode_s = statistics.median(encode)
    return {
        "tiles": tiles,
        "image_tokens": len(image.prompt_tokens),
        "prompt_tokens": len(out.prompt_token_ids),
        "encode_ms_per_image": 1e3 * encode_s,
        "encode_ms_per_tile": 1e3 * encode_s / tiles,
        "ttft_ms": 1e3 * statistics.median(ttft),
        "tower_shapes": vision.compile_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--kind", choices=["llava", "llava_next"], nargs="+", default=["llava", "llava_next"])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    print("| model | tower | tiles | image tokens | prompt tokens | encode ms/image | ms/tile | TTFT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kind:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.size, kind)
            r = measure(Path(tmp), args.passes)
        print(
            f"| {kind} | {args.size} | {r['tiles']} | {r['image_tokens']} | {r['prompt_tokens']} | "
            f"{r['encode_ms_per_image']:.1f} | {r['encode_ms_per_tile']:.1f} | {r['ttft_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
