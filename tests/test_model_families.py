"""Qwen2, Qwen3, Mistral with a sliding window, Gemma, Gemma 2 and Gemma 3 against transformers (CPU, f32)
through the paged KV cache, and their GGUF tensor mapping against a tiny GGUF written the way
llama.cpp's converter writes that architecture. The real Gemma 3 270M file: test_gemma3_270m.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, MistralConfig, Qwen2Config, Qwen3Config

from jaxrs.config import FULL, SLIDING
from jaxrs.errors import ModelLoadError
from jaxrs.loading import checkpoint
from jaxrs.loading.gguf_file import gguf_config, open_gguf_tensors
from jaxrs.loading.gguf_reader import open_gguf, read_metadata
from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
from jaxrs.loading.model_config import config_from_gguf, config_from_hf
from jaxrs.models.layers import activation
from jaxrs.ops import Kernels
from tests.conftest import relative_error, save_tiny_hf_model
from tests.paged import PagedRun, assert_matches_transformers

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
GEMMA = dict(SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # q size 128 != hidden
CONFIGS = {
    "qwen2-tied": Qwen2Config(
        **SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    # window on layer 1 only (layers >= max_window_layers): mixed sliding / full layers
    "qwen2-untied-window": Qwen2Config(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    ),
    # head_dim 32 with hidden 64 / 4 heads (q size 128), q/k norms, q/k/v/o biases; YaRN with its knobs
    "qwen3-yarn-bias": Qwen3Config(
        **GEMMA,
        num_hidden_layers=2,
        attention_bias=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 0.8,
            "mscale_all_dim": 0.5,
        },
    ),
    # window on the last two layers; tied embeddings, MQA; YaRN's defaults (also through a GGUF)
    "qwen3-window": Qwen3Config(
        **(GEMMA | {"num_key_value_heads": 1, "head_dim": 16}),
        num_hidden_layers=3,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral-window": MistralConfig(
        **SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=8
    ),
    "mistral-mha-window16": MistralConfig(
        **SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, sliding_window=16
    ),
    "gemma": GemmaConfig(**GEMMA, num_hidden_layers=2),
    # an odd head_dim (not a power of two), MQA
    "gemma-odd-head-dim": GemmaConfig(
        **(GEMMA | {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 40}), num_hidden_layers=2
    ),
    "gemma2": Gemma2Config(
        **GEMMA,
        num_hidden_layers=2,  # sliding, full
        sliding_window=8,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0,  # small caps so they bite
        final_logit_softcapping=2.0,
    ),
    "gemma2-gqa4-default-caps": Gemma2Config(
        **(GEMMA | {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}),
        num_hidden_layers=4,
        sliding_window=12,
    ),
    # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it
    "gemma3-sss-full": Gemma3TextConfig(
        **GEMMA,
        num_hidden_layers=4,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        sliding_window=6,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": Gemma3TextConfig(
        **GEMMA,
        num_hidden_layers=3,
        layer_types=[SLIDING, FULL, SLIDING],
        sliding_window=8,
        query_pre_attn_scalar=48,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
    ),
    # transformers 5's per-layer-type RoPE: the sliding layers scaled too (YaRN here), globals linear
    "gemma3-local-yarn": Gemma3TextConfig(
        **GEMMA,
        num_hidden_layers=2,
        layer_types=[SLIDING, FULL],
        sliding_window=8,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            "sliding_attention": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 100.0,
            },
        },
    ),
}
PROMPT_LEN, DECODE_STEPS = 32, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, transformers model), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            model = save_tiny_hf_model(CONFIGS[name], path, seed=len(name))
            with torch.no_grad():  # norms (Gemma's are zero-centred) and biases start constant: vary them
                for p in model.parameters():
                    if p.ndim == 1:
                        p.add_(torch.randn(p.shape) * 0.2)
            model.save_pretrained(path)
            built[name] = (path, model)
        return built[name]

    return get


def load_params(path, dtype=np.float32):
    cfg = load_hf_config(path)
    return cfg, checkpoint.load_params(open_hf_tensors(path, checkpoint.hf_weight_names(cfg)), cfg, dtype)


def hf_config(raw: dict):
    return config_from_hf(raw, Path("config.json"))


def test_configs_normalize():
    expect = {  # architecture, window, layer kinds
        "qwen2-tied": ("qwen2", None, ()),
        "qwen2-untied-window": ("qwen2", 8, (FULL, SLIDING)),
        "qwen3-window": ("qwen3", 6, (FULL, SLIDING, SLIDING)),
        "mistral-window": ("llama", 8, (SLIDING, SLIDING)),
        "gemma": ("gemma", None, ()),
        "gemma2": ("gemma2", 8, (SLIDING, FULL)),
        "gemma3": ("gemma3", 8, (SLIDING, FULL, SLIDING)),
    }
    raws = {name: CONFIGS[name].to_dict() for name in CONFIGS}
    for name, want in expect.items():
        cfg = hf_config(raws[name])
        assert (cfg.architecture, cfg.sliding_window, cfg.layer_types) == want, name
    gemma = hf_config(raws["gemma"] | {"hidden_act": "gelu"})  # the official configs' legacy spelling
    assert (gemma.hidden_act, gemma.norm_offset, gemma.embedding_scale) == ("gelu_tanh", 1.0, 8.0)
    assert gemma.tie_word_embeddings and gemma.attention_scale == 32**-0.5
    g2 = hf_config(raws["gemma2"])
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.attention_scale) == (4.0, 2.0, 24**-0.5)
    # transformers' older spellings: no layer_types / rope_parameters
    old_qwen = {k: v for k, v in raws["qwen2-untied-window"].items() if k != "layer_types"}
    assert hf_config(old_qwen | {"num_hidden_layers": 3}).layer_types == (FULL, SLIDING, SLIDING)
    assert hf_config(old_qwen | {"use_sliding_window": False}).sliding_window is None
    old_g2 = {k: v for k, v in raws["gemma2"].items() if k != "layer_types"} | {"num_hidden_layers": 4}
    assert hf_config(old_g2).layer_types == (SLIDING, FULL, SLIDING, FULL)
    old_g3 = raws["gemma3"] | {
        "layer_types": None,
        "sliding_window_pattern": 2,
        "rope_parameters": None,
        "rope_theta": 5.0,
        "rope_local_base_freq": 7.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    g3 = hf_config(old_g3)
    assert g3.layer_types == (SLIDING, FULL, SLIDING) and (g3.rope_theta, g3.rope_local_theta) == (5.0, 7.0)
    assert (g3.rope_scaling.kind, g3.rope_scaling.factor) == ("linear", 8.0)
    assert g3.attn_logit_softcap is None and g3.final_logit_softcap is None
    local = hf_config(raws["gemma3-local-yarn"])
    assert (local.rope_local_theta, local.rope_local_scaling.kind, local.rope_scaling.kind) == (
        100.0,
        "yarn",
        "linear",
    )
    g3_caps = hf_config(raws["gemma3-sss-full"])
    assert g3_caps.attn_logit_softcap is None and g3_caps.final_logit_softcap == 3.0
    q3 = hf_config(raws["qwen3-yarn-bias"])
    assert (q3.head_dim, q3.attention_bias, q3.rope_scaling.kind) == (32, True, "yarn")
    assert (q3.rope_scaling.beta_fast, q3.rope_scaling.beta_slow) == (16.0, 2.0)
    assert q3.rope_scaling.attention_factor == pytest.approx((0.08 * np.log(4) + 1) / (0.05 * np.log(4) + 1))


def test_gelu_tanh_is_torchs():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    ours = np.asarray(activation(jnp.asarray(x), "gelu_tanh"))
    theirs = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert np.abs(np.asarray(activation(jnp.asarray(x), "gelu")) - theirs).max() > 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name, tiny):
    path, ref = tiny(name)
    cfg, params = load_params(path)
    assert_matches_transformers(name, cfg, params, ref, PROMPT_LEN, DECODE_STEPS)


# --- GGUF: a tiny file written as llama.cpp's convert_hf_to_gguf.py writes the architecture ----------

GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}


def write_llama_cpp_gguf(model, path, arch: str) -> None:
    """Tensor names from gguf-py's own HF -> GGUF name map (not ours), Gemma norms stored as w + 1, no
    q/k permutation (llama.cpp permutes only for llama-style converts), llama.cpp's metadata keys."""
    hf = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_vocab_size(hf.vocab_size)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_block_count(hf.num_hidden_layers)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    rope = hf.rope_parameters.get("full_attention", hf.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(hf.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf.attn_logit_softcapping)
        w.add_final_logit_softcapping(hf.final_logit_softcapping)
    if arch == "gemma3":  # not llama.cpp's default pattern (5 sliding, 1 full) nor local base (10000)
        w.add_sliding_window_pattern([t == SLIDING for t in hf.layer_types])
        w.add_rope_freq_base_swa(hf.rope_parameters["sliding_attention"]["rope_theta"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and hf.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "name", ["qwen2-tied", "qwen2-untied-window", "qwen3-window", "gemma", "gemma2", "gemma3"]
)
def test_gguf_gives_the_hf_parameter_tree(name, tiny, tmp_path):
    folder, model = tiny(name)
    hf_cfg, hf_params = load_params(folder)
    path = tmp_path / "tiny.gguf"
    write_llama_cpp_gguf(model, path, GGUF_ARCH[hf_cfg.architecture])
    reader = open_gguf(path)
    cfg = gguf_config(reader, read_metadata(reader), path)
    params = checkpoint.load_params(open_gguf_tensors(reader, cfg, path, packed=False), cfg, np.float32)

    # llama.cpp's Gemma 2/3 query scale is head_dim (hidden / heads for the 27B models): not in the file
    expected = dataclasses.replace(
        hf_cfg,
        name=cfg.name,
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=cfg.eos_token_ids,
        rms_norm_eps=cfg.rms_norm_eps,  # f32 in the file
        query_pre_attn_scalar=cfg.head_dim if hf_cfg.architecture in ("gemma2", "gemma3") else None,
        # llama.cpp's qwen2/qwen3 graphs have no sliding window
        sliding_window=None if cfg.architecture.startswith("qwen") else hf_cfg.sliding_window,
        layer_types=() if cfg.architecture.startswith("qwen") else hf_cfg.layer_types,
    )
    assert cfg == expected
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    flat_hf, tree_hf = jax.tree_util.tree_flatten(hf_params)
    flat, tree = jax.tree_util.tree_flatten(params)
    assert tree == tree_hf
    for a, b in zip(flat, flat_hf, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_gemma2_chunked_prefill_and_pallas_kernel(tiny):
    """Chunks crossing the window give the whole prompt's logits; mixed sliding / global layers pick a
    static window per layer (`lax.cond`), so the Pallas kernel (interpret mode here) runs them too."""
    path, _ = tiny("gemma2")
    cfg, params = load_params(path)
    prompt = np.random.default_rng(4).integers(0, 256, 21).tolist()
    whole = PagedRun(cfg, params, block_size=8, num_blocks=8).feed(prompt)
    for impl in ("xla", "pallas"):
        kernels = Kernels.from_mapping({"paged_attention": impl})
        run = PagedRun(cfg, params, block_size=8, num_blocks=8, kernels=kernels, seed=1)
        chunked = np.concatenate([run.feed(prompt[:13]), run.feed(prompt[13:20]), run.feed(prompt[20:])])
        assert relative_error(chunked, whole) <= 1e-5, impl


def test_gguf_yarn_magnitude_is_llama_cpps():
    """llama.cpp's YaRN magnitude: 0.1 ln(factor) + 1, or mscale(factor, 1) / mscale(factor, L) with
    `yarn_log_multiplier` L, times `attn_factor`; a model-specific `yarn_attn_factor` is refused."""
    meta = {
        "general.architecture": "qwen3",
        "qwen3.attention.head_count": 4,
        "qwen3.embedding_length": 64,
        "qwen3.feed_forward_length": 128,
        "qwen3.block_count": 2,
        "qwen3.vocab_size": 256,
        "qwen3.rope.scaling.type": "yarn",
        "qwen3.rope.scaling.factor": 4.0,
        "qwen3.rope.scaling.original_context_length": 64,
    }
    rs = config_from_gguf(meta, Path("m.gguf"), has_output=True).rope_scaling
    assert (rs.kind, rs.factor, rs.original_max_position_embeddings) == ("yarn", 4.0, 64)
    assert rs.attention_factor == pytest.approx(0.1 * np.log(4) + 1)

    def magnitude(**keys: float) -> float:
        extra = {f"qwen3.rope.scaling.{k}": v for k, v in keys.items()}
        return config_from_gguf(meta | extra, Path("m.gguf"), has_output=True).rope_scaling.attention_factor

    assert magnitude(attn_factor=0.7) == pytest.approx(0.7 * (0.1 * np.log(4) + 1))
    logged = (0.1 * np.log(4) + 1) / (0.1 * 0.5 * np.log(4) + 1)
    assert magnitude(yarn_log_multiplier=0.5) == pytest.approx(logged)
    assert magnitude(yarn_log_multiplier=0.5, attn_factor=2.0) == pytest.approx(2 * logged)
    with pytest.raises(ModelLoadError, match="yarn_attn_factor"):
        magnitude(yarn_attn_factor=0.1)
