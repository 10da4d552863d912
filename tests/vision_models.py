"""Tiny random vision-language models built offline with transformers, saved with their processors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_TOKEN_ID = 255


def save_image_tokenizer(path: Path) -> None:
    """A word-level tokenizer over `w3..w254` with `<image>` (id 255) special, and LLaVA's chat format."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 255)} | {"<image>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<image>"])
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}{% if m['content'] is string %}{{ m['role'] }} {{ m['content'] }} "
        "{% else %}{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": template}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(template)


def _widen(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)


def tiny_llava(path: Path, *, seed: int = 0, strategy: str = "default", feature_layer=-2):
    """A 2-layer Llama behind a 3-layer CLIP (28 px images, 7 px patches: 16 image tokens), the
    processor (CLIP, shortest edge 28, crop 28) saved beside it. Returns the eval-mode torch model."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    path.mkdir(parents=True, exist_ok=True)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    tc = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    model = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
    _widen(model, seed)
    model.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        path
    )
    processor = {
        "patch_size": 7,
        "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": 1,
    }
    (path / "processor_config.json").write_text(
        json.dumps({**processor, "processor_class": "LlavaProcessor"})
    )
    save_image_tokenizer(path)
    return model


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random image (smooth plus noise, so resampling matters)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width, 1)), (y * 255 // max(height, 1)), ((x + y) * 7) % 256], -1)
    noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB").convert(mode)


PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def tiny_llava_next(path: Path, *, seed: int = 0):
    """LLaVA-NeXT over the same tiny CLIP and Llama, with small pinpoints (1x2, 2x1, 2x2, 1x3 tiles of 28)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
    )

    path.mkdir(parents=True, exist_ok=True)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    tc = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaNextConfig(
        vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS
    )
    model = LlavaNextForConditionalGeneration(cfg).to(torch.float32).eval()
    _widen(model, seed)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.5)
    model.save_pretrained(path)
    LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    ).save_pretrained(path)
    processor = {
        "patch_size": 7,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    (path / "processor_config.json").write_text(
        json.dumps({**processor, "processor_class": "LlavaNextProcessor"})
    )
    save_image_tokenizer(path)
    return model
