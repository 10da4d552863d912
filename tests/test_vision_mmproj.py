"""A GGUF text model plus llama.cpp's mmproj GGUF (CLIP + LLaVA projector, written here with gguf-py
under llama.cpp's clip tensor names, the way its LLaVA converter stores them: the last CLIP layer left out,
fc1 as `ffn_down`) give transformers' greedy tokens for an image chat."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from jaxrs import LLM, SamplingParams
from jaxrs.vision.prompt import place_images
from tests.test_model_families_2 import llama_cpp_permute
from tests.vision_models import IMAGE_TOKEN_ID, random_image, tiny_llava

CLIP_NAMES = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm": "v.pre_ln",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down",  # the legacy converter's (swapped) names
    "mlp.fc2": "ffn_up",
}


def write_text_gguf(model, path) -> None:
    hf = model.config.text_config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf.num_hidden_layers)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    w.add_context_length(hf.max_position_embeddings)
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_rope_dimension_count(hf.hidden_size // hf.num_attention_heads)
    w.add_vocab_size(hf.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if not (name.startswith("model.language_model.") or name == "lm_head.weight"):
            continue
        name = name.replace("model.language_model.", "model.")
        data = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, hf.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, hf.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj(model, path) -> None:
    vc = model.config.vision_config
    kept = vc.num_hidden_layers - 1  # LLaVA reads the second-to-last layer: the last is not stored
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.use_gelu", False)
    for key, value in [
        ("embedding_length", vc.hidden_size),
        ("feed_forward_length", vc.intermediate_size),
        ("block_count", kept),
        ("attention.head_count", vc.num_attention_heads),
        ("image_size", vc.image_size),
        ("patch_size", vc.patch_size),
    ]:
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vc.layer_norm_eps)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if name.startswith("model.multi_modal_projector.linear_"):
            layer = 0 if "linear_1" in name else 2
            w.add_tensor(f"mm.{layer}.{name.rsplit('.', 1)[1]}", data)
            continue
        if not name.startswith("model.vision_tower."):
            continue
        name = name.removeprefix("model.vision_tower.").removeprefix("vision_model.")
        if name.startswith("encoder.layers."):
            _, _, layer, rest = name.split(".", 3)
            if int(layer) >= kept:
                continue
            module, kind = rest.rsplit(".", 1)
            w.add_tensor(f"v.blk.{layer}.{CLIP_NAMES[module]}.{kind}", data)
        elif name.startswith("pre_layrnorm"):
            w.add_tensor(f"v.pre_ln.{name.rsplit('.', 1)[1]}", data)
        elif name in CLIP_NAMES:
            w.add_tensor(CLIP_NAMES[name], data.astype(np.float16) if data.ndim == 4 else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-gguf")
    model = tiny_llava(folder)
    write_text_gguf(model, folder / "text.gguf")
    write_mmproj(model, folder / "mmproj.gguf")
    return folder, model


def test_gguf_text_model_with_mmproj_equals_transformers(files):
    folder, model = files
    with torch.no_grad():  # the file keeps the patch embedding in f16, as llama.cpp's converter does
        w = model.model.vision_tower.embeddings.patch_embedding.weight
        w.copy_(w.half().float())
    llm = LLM(
        str(folder / "text.gguf"),
        tokenizer=str(folder),
        mmproj=str(folder / "mmproj.gguf"),
        dtype="float32",
        kv_cache_dtype="float32",
        packed=False,
        block_size=8,
    )
    image = llm.model.vision.processor(random_image(37, 52, seed=3))
    assert len(image.prompt_tokens) == 16
    ids, placed = place_images([1, 5, IMAGE_TOKEN_ID, 6, 7], [IMAGE_TOKEN_ID], [image])
    request = llm.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=6), images=placed)
    llm._run([request], False)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(image.pixel_values),
            max_new_tokens=6,
            do_sample=False,
        )
    assert request.seqs[0].output_ids == ref[0, len(ids) :].tolist()
    (ours,) = llm.model.vision.encode([image])
    with torch.no_grad():
        feats = model.model.get_image_features(
            torch.tensor(image.pixel_values),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    np.testing.assert_allclose(ours, feats.pooler_output[0].numpy(), atol=1e-5, rtol=0)


def test_mmproj_missing_or_wrong_is_a_clear_error(files, tmp_path):
    from jaxrs.errors import ModelLoadError
    from jaxrs.vision.mmproj import load_mmproj

    folder, _ = files
    with pytest.raises(ModelLoadError, match="no such mmproj file"):
        load_mmproj(tmp_path / "none.gguf", None, np.float32)
    with pytest.raises(ModelLoadError, match="not a LLaVA mmproj"):
        load_mmproj(folder / "text.gguf", None, np.float32)
