"""Tiny random FLUX pipelines built offline with diffusers and transformers (the references), saved as a
diffusers folder with `tokenizers` files for both text encoders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = ["<pad>", "</s>", "<unk>", "<|startoftext|>", "<|endoftext|>"] + [
    w for w in "a an the cat dog red blue green sky sea tree house on in of with at".split()
]


def tiny_transformer(guidance: bool, *, in_channels: int = 16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=True,
        scaling_factor=0.5,
        shift_factor=0.1,
    ).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    cfg = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=3,
        eos_token_id=4,
        pad_token_id=4,
    )
    return CLIPTextModel(cfg).eval()


def tiny_t5(gated: bool = True):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    cfg = T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5EncoderModel(cfg).eval()


def scheduler_config(dev: bool) -> dict:
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0 if dev else 1.0,
        "use_dynamic_shifting": dev,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }


def word_tokenizer(post: str):
    """A word-level `tokenizers` tokenizer over `VOCAB`: CLIP-style (start and end tokens) or T5-style
    (end token only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", 3), ("<|endoftext|>", 4)],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def save_pipeline(folder: Path, dev: bool) -> Path:
    """A complete tiny diffusers FLUX folder; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_transformer(dev).save_pretrained(folder / "transformer")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_clip().save_pretrained(folder / "text_encoder")
    tiny_t5().save_pretrained(folder / "text_encoder_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(dev)))
    for sub, kind, length in (("tokenizer", "clip", 16), ("tokenizer_2", "t5", 12)):
        (folder / sub).mkdir(exist_ok=True)
        word_tokenizer(kind).save(str(folder / sub / "tokenizer.json"))
        pad = "<|endoftext|>" if kind == "clip" else "<pad>"
        config = {"model_max_length": length, "pad_token": pad}
        (folder / sub / "tokenizer_config.json").write_text(json.dumps(config))
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
