"""llama.cpp's `mmproj` GGUF (a CLIP tower and LLaVA's MLP projector, as llama.cpp's LLaVA converters
write it) beside a GGUF text model: the same tower modules as an HF LLaVA folder, their parameters read
under llama.cpp's clip tensor names (`v.blk.{i}.attn_q.weight`, `mm.0.weight`, ...; see llama.cpp's
`tools/mtmd/clip-impl.h`). The converter stores only the layers LLaVA reads, so the features are the
last stored layer's; `clip.vision.mm_patch_merge_type = spatial_unpad` with `image_grid_pinpoints` is
LLaVA-NeXT. Images are preprocessed as transformers' CLIP processor does, with the file's mean and std."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jaxrs.errors import ModelLoadError
from jaxrs.loading.gguf_reader import open_gguf, read_metadata, tensor_data
from jaxrs.vision import llava, llava_next
from jaxrs.vision.encoder import VisionModel
from jaxrs.vision.image_ops import CLIP_MEAN, CLIP_STD
from jaxrs.vision.llava import ClipImageProcessing
from jaxrs.vision.loading import load_tower

# our tower parameter path -> llama.cpp's clip tensor name
_NAMES = [
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"vision_tower\.embeddings\.class_embedding", "v.class_embd"),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"vision_tower\.pre_layrnorm\.(weight|bias)", r"v.pre_ln.\1"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"v.blk.\1.attn_\2.\3"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"v.blk.\1.ln\2.\3"),
    (r"multi_modal_projector\.linear_1\.(weight|bias)", r"mm.0.\1"),
    (r"multi_modal_projector\.linear_2\.(weight|bias)", r"mm.2.\1"),
    (r"image_newline", "model.image_newline"),
]
# CLIP's fc1/fc2: older converters wrote fc1 as ffn_down, newer ones as ffn_up; the shape says which
_FFN = re.compile(r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)")


def read_tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, np.ndarray]:
    """Every tensor as f32 in PyTorch's dimension order."""
    out = {}
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        raw = tensor_data(tensor, path)
        out[tensor.name] = gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32).reshape(shape)
    return out


def mmproj_config(meta: dict[str, Any], tensors: dict[str, np.ndarray], path: Path) -> dict:
    """A LLaVA config.json dict for the tower the file holds."""
    if meta.get("clip.projector_type", "mlp") != "mlp":
        raise ModelLoadError(path, f"unsupported mmproj projector {meta.get('clip.projector_type')!r} (mlp)")
    if not meta.get("clip.has_vision_encoder", True) or "mm.2.weight" not in tensors:
        raise ModelLoadError(path, "not a LLaVA mmproj file (no vision encoder or no mm.2 projector)")
    key = "clip.vision."
    try:
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": meta[key + "embedding_length"],
            "intermediate_size": meta[key + "feed_forward_length"],
            "num_hidden_layers": meta[key + "block_count"],
            "num_attention_heads": meta[key + "attention.head_count"],
            "image_size": meta[key + "image_size"],
            "patch_size": meta[key + "patch_size"],
            "layer_norm_eps": meta.get(key + "attention.layer_norm_epsilon", 1e-5),
            "hidden_act": "gelu" if meta.get("clip.use_gelu") else "quick_gelu",
        }
    except KeyError as e:
        raise ModelLoadError(path, f"missing mmproj metadata {e.args[0]!r}") from None
    raw = {
        "vision_config": vision,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "text_config": {"hidden_size": int(tensors["mm.2.weight"].shape[0])},
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": "mm.0.bias" in tensors,
    }
    if meta.get(key + "mm_patch_merge_type") == "spatial_unpad":
        pins = list(meta.get(key + "image_grid_pinpoints") or [])
        raw["image_grid_pinpoints"] = [pins[i : i + 2] for i in range(0, len(pins), 2)]
    return raw


def gguf_name(path: str, tensors: dict[str, np.ndarray], hidden: int) -> list[str]:
    if m := _FFN.match(path):
        layer, which, kind = m.groups()
        for name in (f"v.blk.{layer}.ffn_up.{kind}", f"v.blk.{layer}.ffn_down.{kind}"):
            t = tensors.get(name)
            if t is not None and (t.shape[0] != hidden) == (which == "1"):  # fc1 widens, fc2 narrows
                return [name]
        return [f"v.blk.{layer}.ffn_up.{kind}"]
    for pattern, target in _NAMES:
        if re.fullmatch(pattern, path):
            return [re.sub(pattern, target, path)]
    return [path]


def load_mmproj(path: str | Path, tokenizer: Any, dtype: jnp.dtype) -> VisionModel:
    """The vision tower and processor of a llama.cpp mmproj GGUF, for a text model using `tokenizer`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(path, "no such mmproj file")
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = read_tensors(reader, path)
    raw = mmproj_config(meta, tensors, path)
    module = llava_next if "image_grid_pinpoints" in raw else llava
    family = module.FAMILY
    side = raw["vision_config"]["image_size"]
    images = ClipImageProcessing(
        {
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
            "image_mean": meta.get("clip.vision.image_mean", CLIP_MEAN),
            "image_std": meta.get("clip.vision.image_std", CLIP_STD),
        }
    )
    token = tokenizer.token_to_id("<image>")
    token = 0 if token is None else token  # the features replace these tokens' embeddings anyway
    vcfg = llava.vision_config(raw)
    if module is llava_next:
        processor = llava_next.LlavaNextProcessor(
            images, raw["image_grid_pinpoints"], token, "<image>", vcfg.grid
        )
    else:
        processor = llava.LlavaProcessor(images, token, "<image>", vcfg.grid**2)
    hidden = raw["vision_config"]["hidden_size"]

    def get(name: str) -> np.ndarray:
        return tensors[name]

    names = lambda p: gguf_name(p, tensors, hidden)  # noqa: E731
    family = dataclasses.replace(family, tower_names=names)
    graph, params = load_tower(family, raw, get, dtype, path)
    return VisionModel(family, processor, graph, params, dtype)
