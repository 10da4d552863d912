"""Phi-3 Vision against a reference written here from Microsoft's published code
(microsoft/Phi-3-vision-128k-instruct: image_processing_phi3_v.py, image_embedding_phi3_v.py) in
torch + Pillow: tiles and token counts for odd sizes and extreme aspect ratios, the HD merge +
projection over transformers' CLIPVisionModel features, and a prompt forward through jaxrs's Phi-3
fed the merged embeddings against transformers' Phi3ForCausalLM."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file

from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.loading import checkpoint
from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
from jaxrs.vision.phi3_vision import (
    CLIP_MEAN,
    CLIP_STD,
    Phi3VisionProcessor,
    load_phi3_vision_projector,
    num_image_tokens,
)
from tests.conftest import relative_error, save_tiny_hf_model
from tests.paged import PagedRun

transformers = pytest.importorskip("transformers")

NUM_CROPS = 4
# (width, height): odd sizes, exact and off-by-one multiples of 336, extreme ratios both ways, a pixel
SIZES = [(37, 53), (336, 336), (337, 335), (1000, 20), (20, 1000), (671, 1), (1, 1), (901, 457)]
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336)
TEXT_HIDDEN = 48


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# -- the reference, from the published code ---------------------------------------------------------------


def reference_preprocess(image: Image.Image, num_crops: int) -> tuple[torch.Tensor, tuple[int, int], int]:
    """Tiles (global view first), padded (height, width) and token count, as the published processor
    computes them (torchvision's PIL resize and pad done with the same Pillow calls)."""
    img = image.convert("RGB")
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = img.width / img.height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_h / 336) * 336)
    top = int((target - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    glob = torch.nn.functional.interpolate(x[None], size=(336, 336), mode="bicubic")
    h, w = x.shape[1:]
    crops = x.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    tokens = int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)
    return torch.cat([glob, crops]), (h, w), tokens


def reference_rows(features: torch.Tensor, size: tuple[int, int], weights: dict) -> torch.Tensor:
    """The published HD feature transform ("sub_glb") and the img_projection MLP for one image."""
    h_crop, w_crop = size[0] // 336, size[1] // 336
    glb_gn, sub_gn = torch.from_numpy(weights["glb_GN"]), torch.from_numpy(weights["sub_GN"])

    def merged(feats: torch.Tensor, hc: int, wc: int) -> torch.Tensor:
        n, length, c = feats.shape
        side = int(length**0.5)
        x = feats.reshape(n, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
        x = x.reshape(1, hc, wc, side // 2, side // 2, 4 * c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(1, hc * side // 2, wc * side // 2, 4 * c)

    def newline(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, sub_gn.expand(1, x.shape[1], -1, -1)], dim=2).reshape(1, -1, x.shape[-1])

    glob = newline(merged(features[:1], 1, 1))
    sub = newline(merged(features[1 : 1 + h_crop * w_crop], h_crop, w_crop))
    rows = torch.cat([sub[0], glb_gn[0], glob[0]])
    first = torch.nn.functional.linear(
        rows,
        torch.from_numpy(weights["img_projection.0.weight"]),
        torch.from_numpy(weights["img_projection.0.bias"]),
    )
    return torch.nn.functional.linear(
        torch.nn.functional.gelu(first),
        torch.from_numpy(weights["img_projection.2.weight"]),
        torch.from_numpy(weights["img_projection.2.bias"]),
    )


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Phi-3 Vision folder: config.json, preprocessor_config.json, the projector's tensors under
    the published names; and a tiny CLIP (transformers) as the encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = tmp_path_factory.mktemp("phi3v")
    dim = CLIP["hidden_size"]
    rng = np.random.default_rng(0)
    weights = {
        "glb_GN": rng.normal(0, 1, (1, 1, 4 * dim)),
        "sub_GN": rng.normal(0, 1, (1, 1, 1, 4 * dim)),
        "img_projection.0.weight": rng.normal(0, 0.1, (TEXT_HIDDEN, 4 * dim)),
        "img_projection.0.bias": rng.normal(0, 0.1, (TEXT_HIDDEN,)),
        "img_projection.2.weight": rng.normal(0, 0.1, (TEXT_HIDDEN, TEXT_HIDDEN)),
        "img_projection.2.bias": rng.normal(0, 0.1, (TEXT_HIDDEN,)),
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    save_file(
        {f"model.vision_embed_tokens.{k}": v for k, v in weights.items()}, str(path / "model.safetensors")
    )
    config = {
        "architectures": ["Phi3VForCausalLM"],
        "hidden_size": TEXT_HIDDEN,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {"image_dim_out": dim, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": 144},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(
        json.dumps({"num_crops": NUM_CROPS, "image_processor_type": "x"})
    )
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP, patch_size=14)).eval()
    return path, weights, clip


def _clip_features(clip, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The published feature choice: the second-to-last layer's hidden states, CLS dropped."""
    with torch.no_grad():
        out = clip(torch.as_tensor(tiles), output_hidden_states=True)
    return out.hidden_states[-2][:, 1:]


# -- tests ------------------------------------------------------------------------------------------------


def test_tiles_and_token_counts_match_reference(folder):
    path = folder[0]
    ours = Phi3VisionProcessor.from_folder(path, {"<|image|>": 32044})
    assert ours.num_crops == NUM_CROPS and ours.marker == "<|image_1|>"
    for seed, (w, h) in enumerate(SIZES):
        image = _image(w, h, seed)
        ref_tiles, ref_size, ref_tokens = reference_preprocess(image, NUM_CROPS)
        got = ours(image)
        assert got.pixel_values.shape == tuple(ref_tiles.shape), (w, h)
        assert tuple(got.extras["image_size"]) == ref_size, (w, h)
        assert len(got.prompt_tokens) == ref_tokens == num_image_tokens(w, h, NUM_CROPS), (w, h)
        assert got.feature_mask.all() and set(got.prompt_tokens) == {32044}
        np.testing.assert_array_equal(got.pixel_values[1:], ref_tiles[1:].numpy())  # the crops: exact
        np.testing.assert_allclose(got.pixel_values[0], ref_tiles[0].numpy(), rtol=0, atol=2e-5)  # bicubic


def test_token_count_formula_cases():
    assert num_image_tokens(336, 336, 16) == (16 + 1) * 144 + 1 + 5 * 12  # 4x4 crops of a square
    assert num_image_tokens(336, 336, 1) == 2 * 144 + 1 + 2 * 12  # one crop
    assert num_image_tokens(1000, 20, 4) == num_image_tokens(20, 1000, 4) - 3 * 12  # rows differ by h_crop
    with pytest.raises(JaxrsError, match="too elongated"):
        num_image_tokens(5000, 1, 4)


def test_projection_matches_reference(folder):
    path, weights, clip = folder
    projector, cfg = load_phi3_vision_projector(path)
    processor = Phi3VisionProcessor.from_folder(path, {})
    for seed, (w, h) in enumerate([(901, 457), (20, 1000)]):
        image = processor(_image(w, h, seed))
        feats = _clip_features(clip, image.pixel_values)
        size = tuple(int(v) for v in image.extras["image_size"])
        ref = reference_rows(feats, size, weights).numpy()
        grid = (size[0] // 336, size[1] // 336)
        got = np.asarray(projector(jnp.asarray(feats.numpy()), grid))
        assert got.shape == (len(image.prompt_tokens), cfg.hidden_size)
        assert relative_error(got, ref) <= 1e-5


def test_prompt_logits_match_transformers(folder, tmp_path):
    """BOS + text, the image rows, BOS + text (the published per-chunk BOS) through jaxrs's Phi-3 over
    the merged embeddings gives transformers' Phi3ForCausalLM logits over the same embeddings."""
    from transformers import Phi3Config

    path, weights, clip = folder
    projector, _ = load_phi3_vision_projector(path)
    processor = dataclasses.replace(Phi3VisionProcessor.from_folder(path, {}), num_crops=1)  # 319 tokens
    text_cfg = Phi3Config(
        vocab_size=128, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0,
    )  # fmt: skip
    ref_model = save_tiny_hf_model(text_cfg, tmp_path)
    image = processor(_image(37, 53, 1))
    feats = _clip_features(clip, image.pixel_values)
    grid = tuple(int(v) // 336 for v in image.extras["image_size"])
    rows = np.asarray(projector(jnp.asarray(feats.numpy()), grid))
    tokens = [1, 5, 9, *image.prompt_tokens, 1, 7, 3]
    mask = np.zeros(len(tokens), bool)
    mask[3 : 3 + len(image.prompt_tokens)] = image.feature_mask

    cfg = load_hf_config(tmp_path)
    params = checkpoint.load_params(
        open_hf_tensors(tmp_path, checkpoint.hf_weight_names(cfg)), cfg, np.float32
    )
    embeds = np.asarray(params["embed"]["weight"])[tokens]
    embeds[mask] = rows
    ours = PagedRun(cfg, params, block_size=16, num_blocks=64, seed=5).feed(tokens, embeds)
    with torch.no_grad():
        ref = ref_model(inputs_embeds=torch.from_numpy(embeds)[None]).logits[0].numpy()
    err = relative_error(ours, ref)
    print(f"phi3 vision prompt logits ({len(tokens)} tokens): max relative error {err:.2e}")
    assert err <= 1e-4 and (ours.argmax(-1) == ref.argmax(-1)).all()


def test_bad_configs_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="not a Phi-3 Vision config"):
        load_phi3_vision_projector(tmp_path)
    embd = {"use_hd_transform": True, "with_learnable_separator": True, "hd_transform_order": "glb_sub"}
    raw = {"hidden_size": 8, "embd_layer": embd | {"projection_cls": "mlp"}, "img_processor": {}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="hd_transform_order"):
        load_phi3_vision_projector(tmp_path)
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        Phi3VisionProcessor.from_folder(tmp_path, {})


def test_tower_wires_encoder_to_projector(folder):
    """The tower feeds its encoder's patch features and the image's crop grid to the projector (a
    stand-in encoder here; the CLIP module takes its place)."""
    from flax import nnx

    from jaxrs.vision.phi3_vision import Phi3VisionTower

    class MeanPatches(nnx.Module):  # [tiles, 3, 336, 336] -> [tiles, 576, C]: 14 x 14 patch means
        def __call__(self, px):
            t = px.shape[0]
            means = (
                px.reshape(t, 3, 24, 14, 24, 14).mean(axis=(3, 5)).transpose(0, 2, 3, 1).reshape(t, 576, 3)
            )
            return jnp.tile(means, (1, 1, CLIP["hidden_size"] // 3 + 1))[..., : CLIP["hidden_size"]]

    path = folder[0]
    projector, _ = load_phi3_vision_projector(path)
    image = Phi3VisionProcessor.from_folder(path, {})(_image(700, 300, 4))
    tower = Phi3VisionTower(MeanPatches(), projector)
    px = jnp.asarray(image.pixel_values)
    rows = np.asarray(tower(px, image_size=image.extras["image_size"]))
    grid = (int(image.extras["image_size"][0]) // 336, int(image.extras["image_size"][1]) // 336)
    np.testing.assert_array_equal(rows, np.asarray(projector(MeanPatches()(px), grid)))
    assert rows.shape[0] == len(image.prompt_tokens)
    with pytest.raises(JaxrsError, match="do not hold a global view"):
        projector(MeanPatches()(px[:2]), grid)


# -- a whole Phi-3 Vision folder through the engine -------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(folder, tmp_path_factory):
    """config.json (model_type phi3_v, a tiny CLIP named in `img_processor.vision_config`), one safetensors
    with the published names (text model, `vision_embed_tokens.img_processor.*` CLIP, projector), the
    processor config (one crop) and a BOS-adding word-level tokenizer. Returns the folder and the torch
    text model."""
    from safetensors.torch import save_file as save_torch
    from transformers import Phi3Config

    from tests.conftest import save_tiny_tokenizer

    _, weights, clip = folder
    path = tmp_path_factory.mktemp("phi3v_model")
    text_dir = tmp_path_factory.mktemp("phi3v_text")
    text_cfg = Phi3Config(
        vocab_size=128, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    text_model = save_tiny_hf_model(text_cfg, text_dir)
    tensors = {k: v.contiguous() for k, v in text_model.state_dict().items()}
    clip_names = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    tensors |= {f"model.vision_embed_tokens.img_processor.vision_model.{k}": v for k, v in clip_names.items()}
    tensors |= {f"model.vision_embed_tokens.{k}": torch.from_numpy(v) for k, v in weights.items()}
    save_torch(tensors, str(path / "model.safetensors"))
    config = json.loads((text_dir / "config.json").read_text())
    config |= {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "img_processor": {"image_dim_out": CLIP["hidden_size"], "name": "clip_vision_model",
                          "num_img_tokens": 144, "vision_config": CLIP | {"patch_size": 14}},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps({"num_crops": 1}))
    save_tiny_tokenizer(path, 128)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config | {"add_bos_token": True}))
    return path, text_model


def _published_ids(path, text: str, images: list) -> list[int]:
    """The published processor's ids: each piece between markers tokenized with its BOS, each marker
    replaced by its image's placeholder tokens (the id is jaxrs's: any id serves, its row is replaced)."""
    import re

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    pieces = re.split(r"<\|image_\d+\|>", text)
    out = []
    for k, piece in enumerate(pieces):
        out += [1, *tok.encode(piece, add_special_tokens=False).ids]
        if k < len(images):
            out += list(images[k].prompt_tokens)
    return out


def test_chat_greedy_tokens_equal_the_reference(folder, model_folder):
    """`LLM.chat` on the folder: the published prompt ids, and the greedy tokens of the reference
    forward (transformers' CLIP features, the published HD transform and projection, Phi3ForCausalLM over
    the merged embeddings) driven step by step."""
    from jaxrs import LLM, SamplingParams

    _, weights, clip = folder
    path, text_model = model_folder
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="float32", packed=False, block_size=16)
    vision = llm.engine.model.vision
    assert vision.family.name == "phi3_v" and vision.marker == "<|image_1|>"
    picture = _image(53, 37, 11)
    content = [
        {"type": "text", "text": "w5 w9"},
        {"type": "image", "image": picture},
        {"type": "text", "text": "w7 w3"},
    ]
    greedy = SamplingParams(temperature=0, max_tokens=5, logprobs=5)
    out = llm.chat([{"role": "user", "content": content}], greedy, use_tqdm=False)[0]

    image = vision.processor(picture)
    ids = _published_ids(path, "w5 w9\n<|image_1|>\nw7 w3 ", [image])
    assert out.prompt_token_ids == ids
    rows = reference_rows(
        _clip_features(clip, image.pixel_values), tuple(image.extras["image_size"]), weights
    )
    embed = text_model.model.embed_tokens.weight.detach()
    start = 3  # after the first piece: BOS w5 w9
    embeds = torch.cat([embed[ids[:start]], rows, embed[ids[start + len(rows) :]]])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(5):
            last = text_model(inputs_embeds=embeds[None]).logits[0, -1]
            logprobs.append(torch.log_softmax(last, -1).numpy())
            tokens.append(int(last.argmax()))
            embeds = torch.cat([embeds, embed[tokens[-1:]]])
    assert out.outputs[0].token_ids == tokens
    for step, ref in zip(out.outputs[0].logprobs, logprobs, strict=True):  # the whole distribution
        for token, logprob in step.top:
            assert abs(logprob - ref[token]) < 2e-4, (token, logprob, ref[token])
    assert vision.compile_count() == 1

    # the server assembles the prompt the same way: the same ids (counted) and answer for a data URL
    import openai
    from litestar.testing import TestClient

    from server import create_app

    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(encoded.getvalue()).decode()
    parts = [content[0], {"type": "image_url", "image_url": {"url": url}}, content[2]]
    with TestClient(create_app(llm, served_model_name="x")) as client:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
        resp = oai.chat.completions.create(
            model="x", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=5
        )
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == out.outputs[0].text
