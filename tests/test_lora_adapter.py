"""Reading peft LoRA adapters: scalings (alpha / r, rsLoRA, alpha_pattern), padding of ranks and layers,
and the errors naming what cannot be served; the LoRA options of the command line and the Python API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxrs.errors import JaxrsError
from jaxrs.loading.hf_folder import load_hf_config
from jaxrs.lora.adapter import read_adapter
from jaxrs.lora.config import LoraConfig, lora_options, parse_lora_arg

HIDDEN, FFN, LAYERS = 64, 128, 2


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg")
    LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(path)
    return load_hf_config(path)


def adapter(path, modules: dict[str, tuple[int, int]], rank=4, layers=(0, 1), **config):
    """An adapter folder: module (layer-relative name) -> (out, in), ones in A and twos in B."""
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        for i in layers:
            name = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ones((rank, in_features), np.float32)
            tensors[f"{name}.lora_B.weight"] = np.full((out_features, rank), 2.0, np.float32)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, **config}))
    return path


def test_scalings_ranks_and_layers(cfg, tmp_path):
    modules = {"self_attn.q_proj": (HIDDEN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    plain = read_adapter("a", adapter(tmp_path / "a", modules, lora_alpha=8, layers=(1,)), cfg, 16)
    a, b = plain.weights[("attn", "q_proj")]
    assert a.shape == (LAYERS, 4, HIDDEN) and b.shape == (LAYERS, HIDDEN, 4)
    assert np.all(a[0] == 0) and np.all(b[0] == 0)  # layer 0 left alone
    assert np.allclose(b[1], 2.0 * 8 / 4)
    rs = adapter(tmp_path / "rs", modules, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 2})
    rs = read_adapter("rs", rs, cfg, 16)
    assert np.allclose(rs.weights[("attn", "q_proj")][1][1], 2.0 * 8 / math.sqrt(4))
    assert np.allclose(rs.weights[("mlp", "down_proj")][1][1], 2.0 * 2 / math.sqrt(4))


@pytest.mark.parametrize(
    "modules, config, rank, message",
    [
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {}, 8, "rank 8 at .*max_lora_rank is 4"),
        ({"embed_tokens": (256, HIDDEN)}, {}, 4, "targets .*embed_tokens, which jaxrs does not adapt"),
        ({"self_attn.q_proj": (HIDDEN, 2 * HIDDEN)}, {}, 4, "does not fit this model"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"use_dora": True}, 4, "uses DoRA"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"bias": "all"}, 4, "trains biases"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"peft_type": "IA3"}, 4, "IA3 adapter, not LORA"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"lora_bias": True}, 4, "bias on lora_B"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"layer_replication": [[0, 2]]}, 4, "layer_replication"),
        ({"self_attn.q_proj": (HIDDEN, HIDDEN)}, {"alora_invocation_tokens": [5]}, 4, "activated LoRA"),
    ],
)
def test_what_cannot_be_served_is_named(cfg, tmp_path, modules, config, rank, message):
    path = adapter(tmp_path / "x", modules, rank=rank, **config)
    with pytest.raises(JaxrsError, match=message):
        read_adapter("x", path, cfg, max_rank=4)


def test_tensors_beside_a_and_b_are_refused_by_name(cfg, tmp_path):
    """A lora_B bias (peft's lora_bias, whatever the config says) would otherwise be dropped silently."""
    from safetensors.numpy import load_file

    path = adapter(tmp_path / "x", {"self_attn.q_proj": (HIDDEN, HIDDEN)})
    tensors = load_file(str(path / "adapter_model.safetensors"))
    bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    save_file({**tensors, bias: np.ones(HIDDEN, np.float32)}, str(path / "adapter_model.safetensors"))
    with pytest.raises(JaxrsError, match="holds .*lora_B.bias, which jaxrs does not serve"):
        read_adapter("x", path, cfg, max_rank=4)
    named = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in tensors.items()
    }
    save_file(named, str(path / "adapter_model.safetensors"))  # keys that still carry the adapter's name
    assert read_adapter("x", path, cfg, max_rank=4).weights.keys() == {("attn", "q_proj")}


def test_a_vision_towers_layers_are_not_taken_for_the_text_models(cfg, tmp_path):
    """peft's `target_modules=["q_proj"]` on LLaVA adapts the CLIP tower's q_proj too: `layers.0` there is
    no text layer (of the same width it would have been written over it)."""
    tensors = {}
    for where in ("model.language_model", "model.vision_tower.vision_model.encoder"):
        name = f"base_model.model.{where}.layers.0.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = np.ones((4, HIDDEN), np.float32)
        tensors[f"{name}.lora_B.weight"] = np.ones((HIDDEN, 4), np.float32)
    path = tmp_path / "x"
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(JaxrsError, match="vision_tower.*in the vision tower or projector"):
        read_adapter("x", path, cfg, max_rank=4)


def test_missing_files(cfg, tmp_path):
    with pytest.raises(JaxrsError, match="no adapter_config.json"):
        read_adapter("x", tmp_path, cfg, 8)


def test_options():
    assert parse_lora_arg("sql=/a/b=c") == ("sql", "/a/b=c")
    with pytest.raises(JaxrsError, match="NAME=PATH"):
        parse_lora_arg("sql")
    with pytest.raises(JaxrsError, match="unique"):
        LoraConfig((("a", "/x"), ("a", "/y")))
    with pytest.raises(JaxrsError, match="max_loras is 1"):
        LoraConfig((("a", "/x"), ("b", "/y")), max_loras=1)
    assert lora_options({"max_num_seqs": 4}) == {"max_num_seqs": 4}
    options = lora_options({"lora_adapters": {"a": "/x"}, "max_lora_rank": 64, "enable_runtime_lora": True})
    assert options["lora"] == LoraConfig((("a", "/x"),), max_lora_rank=64, runtime=True)


def test_command_line():
    from jaxrs.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(
        ["serve", "--lora", "a=/x", "--lora-modules", "b=/y", "--max-loras", "3", "--enable-runtime-lora"]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["lora_adapters"] == {"a": "/x", "b": "/y"} and kwargs["max_loras"] == 3
    assert lora_options(kwargs)["lora"] == LoraConfig((("a", "/x"), ("b", "/y")), max_loras=3, runtime=True)
    assert "lora" not in lora_options(engine_kwargs(build_parser().parse_args(["serve"])))
