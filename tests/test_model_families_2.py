"""Phi-2, Phi-3 (LongRoPE), Starcoder2 and Mixtral against transformers (CPU, f32) through the paged KV
cache, and their GGUF tensor mapping against tiny GGUFs written the way llama.cpp's converter writes
each architecture (tensor names from gguf-py's own map, not ours)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import MixtralConfig, Phi3Config, PhiConfig, Starcoder2Config

from jaxrs.config import SLIDING
from jaxrs.loading import checkpoint, load_model
from jaxrs.loading.checkpoint import take
from jaxrs.loading.gguf_file import gguf_config, open_gguf_tensors
from jaxrs.loading.gguf_reader import open_gguf, read_metadata
from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
from jaxrs.loading.model_config import config_from_hf
from jaxrs.quant import QuantizedTensor, dequantize, quantize
from tests.conftest import relative_error, save_tiny_hf_model, save_tiny_tokenizer
from tests.paged import PagedRun

IDS = dict(bos_token_id=1, eos_token_id=2)
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=256, **IDS)
FACTORS = np.random.default_rng(7)


def factors(n: int, low: float, high: float) -> list[float]:
    return [float(f) for f in FACTORS.uniform(low, high, n)]


CONFIGS = {
    # Phi-2's shape: MHA, half the head rotated, feed-forward 4 x hidden (llama.cpp writes 4 * n_embd)
    "phi": PhiConfig(**(SMALL | {"intermediate_size": 256}), num_hidden_layers=2, num_attention_heads=4),
    # the 32-token prompt is past original_max_position_embeddings: long factors from the first step
    "phi3-longrope-window": Phi3Config(
        **SMALL,
        pad_token_id=0,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": factors(8, 1.0, 1.5),
            "long_factor": factors(8, 2.0, 8.0),
        },
    ),
    # short factors for the prompt, long ones from decode step 5 on (length 37 > 36); Phi-4-mini's
    # partial rotary (0.75 of each head)
    "phi3-longrope-switch": Phi3Config(
        **SMALL,
        pad_token_id=0,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        original_max_position_embeddings=36,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": factors(6, 1.0, 1.5),
            "long_factor": factors(6, 2.0, 8.0),
        },
    ),
    "phi-quarter-rotary-gqa": PhiConfig(
        **(SMALL | {"intermediate_size": 256}),
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        partial_rotary_factor=0.25,
    ),
    "starcoder2-untied-mqa": Starcoder2Config(
        **SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False
    ),
    "mixtral-3-experts-window": MixtralConfig(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=3,
        num_experts_per_tok=2,
        sliding_window=8,
    ),
    "starcoder2-window": Starcoder2Config(
        **SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=8
    ),
    "mixtral": MixtralConfig(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}
PROMPT_LEN, DECODE_STEPS = 32, 8
Q8 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, transformers model), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            model = save_tiny_hf_model(CONFIGS[name], path, seed=len(name))
            with torch.no_grad():  # norms and biases start constant: vary them
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


def test_configs_normalize():
    raws = {name: c.to_dict() for name, c in CONFIGS.items()}
    cfgs = {name: config_from_hf(raw, Path("config.json")) for name, raw in raws.items()}
    names = ("phi", "phi3-longrope-window", "phi3-longrope-switch", "starcoder2-window", "mixtral")
    phi, p3, p3s, sc, mx = (cfgs[n] for n in names)
    assert (phi.architecture, phi.rotary_dim, phi.layer_norm, phi.parallel_block) == ("phi", 8, True, True)
    assert (
        phi.hidden_act == "gelu_tanh" and phi.attention_bias and phi.mlp_bias and not phi.tie_word_embeddings
    )
    assert (p3.architecture, p3.sliding_window, p3.layer_types) == ("phi3", 8, (SLIDING, SLIDING))
    rs = p3.rope_scaling
    assert (rs.kind, rs.original_max_position_embeddings, rs.factor) == ("longrope", 16, 16.0)
    assert rs.attention_factor == pytest.approx(2**0.5) and len(rs.long_factor) == 8
    assert p3s.rotary_dim == 12 and len(p3s.rope_scaling.short_factor) == 6
    assert (sc.architecture, sc.layer_norm, sc.tie_word_embeddings, sc.attention_bias) == (
        "starcoder2",
        True,
        True,
        True,
    )
    assert (mx.architecture, mx.num_experts, mx.num_experts_per_tok) == ("mixtral", 4, 2)
    # transformers 4 left class defaults out of a config.json: Starcoder2's embeddings are then tied
    no_tie = {k: v for k, v in raws["starcoder2-window"].items() if k != "tie_word_embeddings"}
    assert config_from_hf(no_tie, Path("config.json")).tie_word_embeddings
    # older spellings: rope_scaling "su", a top-level original length that wins over the dict's
    old = raws["phi3-longrope-window"] | {
        "rope_parameters": None,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "original_max_position_embeddings": 64,
    }
    assert config_from_hf(old, Path("c.json")).rope_scaling.original_max_position_embeddings == 64
    with pytest.raises(Exception, match="qk_layernorm"):
        config_from_hf(raws["phi"] | {"qk_layernorm": True}, Path("config.json"))


def transformers_greedy(ref, prompt: list[int], steps: int, *, cached: bool) -> tuple[list, list[int]]:
    """Reference logits for the prompt then `steps` greedy tokens: either recomputing the whole sequence
    each step, or feeding one token at a time through transformers' own KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=cached)
        logits, cache = [out.logits[0].numpy()], out.cache
        for _ in range(steps):
            ids.append(int(np.argmax(logits[-1][-1])))
            if cached:
                out = ref(torch.tensor([ids[-1:]]), cache=cache, use_cache=True)
                cache = out.cache
            else:
                out = ref(torch.tensor([ids]))
            logits.append(out.logits[0, -1:].numpy())
    return logits, ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name, tiny):
    """LongRoPE switching mid-generation is compared with transformers' cached decoding (keys keep the
    rotation they were written with); everything else with recomputing the whole sequence."""
    path, ref = tiny(name)
    cfg, params = load_params(path)
    prompt = np.random.default_rng(1).integers(0, 256, PROMPT_LEN).tolist()
    theirs, ids = transformers_greedy(ref, prompt, DECODE_STEPS, cached=name.endswith("switch"))

    run = PagedRun(cfg, params, block_size=8, num_blocks=16, seed=3)
    ours = [run.feed(prompt)]
    for step, token in enumerate(ids[PROMPT_LEN:]):
        assert int(np.argmax(ours[-1][-1])) == token, f"greedy token {step} differs"
        ours.append(run.feed([token]))
    ours_all, theirs_all = np.concatenate(ours), np.concatenate(theirs)
    assert ours_all.shape == (PROMPT_LEN + DECODE_STEPS, 256)
    err = relative_error(ours_all, theirs_all)
    print(f"{name}: max relative logit error {err:.2e}")
    assert err <= 1e-4


def test_longrope_switch_is_not_a_recompute(tiny):
    """Past the switch, a cached sequence and a recomputed one differ (the cached keys keep their short-
    factor rotation), so the switch test above does check which of the two we do."""
    _, ref = tiny("phi3-longrope-switch")
    prompt = np.random.default_rng(1).integers(0, 256, PROMPT_LEN).tolist()
    cached, ids = transformers_greedy(ref, prompt, DECODE_STEPS, cached=True)
    with torch.no_grad():
        short = ref(torch.tensor([ids[:36]])).logits[0, -1].numpy()  # length 36: short factors throughout
        long = ref(torch.tensor([ids[:-1]])).logits[0, -1].numpy()  # length 39: long factors throughout
    assert relative_error(short, cached[36 - PROMPT_LEN][0]) < 1e-5
    assert relative_error(long, cached[-1][0]) > 1e-3


# --- GGUF: tiny files written as llama.cpp's convert_hf_to_gguf.py writes each architecture -----------


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half rows -> interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_cpp_gguf(model, folder: Path, path: Path, arch: str, *, variant: str = "") -> None:
    """Metadata as each converter class writes it (Phi2Model, Phi3MiniModel, StarCoder2Model,
    LlamaModel for Mixtral); the checkpoint's tensors (as saved in `folder`: transformers 5 keeps
    Mixtral's experts fused in memory but saves them per expert) named through gguf-py's map.
    `variant`: "fused-qkv" (phi2 from the original Wqkv checkpoints), "expert-per-tensor" (Mixtral
    files from before 3-D expert tensors), "q8-experts" (3-D expert tensors stored Q8_0)."""
    hf = model.config
    rope = hf.rope_parameters
    n_embd, n_head, n_layer = hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers
    head_dim = n_embd // n_head
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    w = gguf.GGUFWriter(path, "llama" if arch == "mixtral" else arch)
    w.add_block_count(n_layer)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_vocab_size(hf.vocab_size)
    if arch == "phi2":
        w.add_feed_forward_length(4 * n_embd)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(hf.layer_norm_eps)
        w.add_rope_dimension_count(rope_dims)
    else:
        w.add_feed_forward_length(hf.intermediate_size)
        w.add_head_count_kv(hf.num_key_value_heads)
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_layer_norm_rms_eps(hf.rms_norm_eps)
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(hf.sliding_window or 0)
        scale = hf.max_position_embeddings / rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(
            float(np.sqrt(1 + np.log(scale) / np.log(rope["original_max_position_embeddings"])))
        )
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    if arch == "starcoder2":
        w.add_layer_norm_eps(hf.norm_epsilon)
    if arch == "mixtral":
        w.add_layer_norm_rms_eps(hf.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        w.add_expert_count(hf.num_local_experts)
        w.add_expert_used_count(hf.num_experts_per_tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH["LLAMA" if arch == "mixtral" else arch.upper()], n_layer)
    state = {k: v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}
    if hf.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i in range(n_layer):
        layer = f"model.layers.{i}."
        if variant == "fused-qkv":  # the original phi-2 layout: one Wqkv (weight and bias)
            for kind in ("weight", "bias"):
                qkv = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
                state[f"transformer.h.{i}.mixer.Wqkv.{kind}"] = np.concatenate(qkv)
        if arch == "mixtral":
            q, k = f"{layer}self_attn.q_proj.weight", f"{layer}self_attn.k_proj.weight"
            state[q] = llama_cpp_permute(state[q], n_head)
            state[k] = llama_cpp_permute(state[k], hf.num_key_value_heads)
            for wid, old in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
                experts = [
                    state.pop(f"{layer}block_sparse_moe.experts.{e}.{wid}.weight")
                    for e in range(hf.num_local_experts)
                ]
                if variant == "expert-per-tensor":  # llama.cpp's names before 3-D expert tensors
                    for e, data in enumerate(experts):
                        w.add_tensor(f"blk.{i}.ffn_{old}.{e}.weight", data)
                else:
                    state[f"{layer}block_sparse_moe.experts.{wid}.weight"] = np.stack(experts)
    for name, data in state.items():
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert mapped is not None, name
        if variant == "q8-experts" and "_exps" in mapped:
            w.add_tensor(mapped, gguf.quants.quantize(data, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(mapped, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {  # test id -> (config, llama.cpp arch, variant)
    "phi2": ("phi", "phi2", ""),
    "phi2-fused-qkv": ("phi", "phi2", "fused-qkv"),
    "phi3": ("phi3-longrope-window", "phi3", ""),
    "phi3-partial-rotary": ("phi3-longrope-switch", "phi3", ""),
    "starcoder2": ("starcoder2-window", "starcoder2", ""),
    "mixtral-3d-experts": ("mixtral", "mixtral", ""),
    "mixtral-expert-per-tensor": ("mixtral", "mixtral", "expert-per-tensor"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_gives_the_hf_parameter_tree(case, tiny, tmp_path):
    name, arch, variant = GGUF_CASES[case]
    folder, model = tiny(name)
    hf_cfg, hf_params = load_params(folder)
    path = tmp_path / "tiny.gguf"
    write_llama_cpp_gguf(model, folder, path, arch, variant=variant)
    reader = open_gguf(path)
    cfg = gguf_config(reader, read_metadata(reader), path)
    params = checkpoint.load_params(open_gguf_tensors(reader, cfg, path, packed=False), cfg, np.float32)

    f32 = np.float32
    expected = dataclasses.replace(
        hf_cfg,
        name=cfg.name,
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=cfg.eos_token_ids,
        rms_norm_eps=float(f32(hf_cfg.rms_norm_eps)),  # f32 in the file
        rope_scaling=dataclasses.replace(  # factors and attention factor: f32 in the file
            hf_cfg.rope_scaling,
            short_factor=cfg.rope_scaling.short_factor,
            long_factor=cfg.rope_scaling.long_factor,
            attention_factor=cfg.rope_scaling.attention_factor,
        ),
    )
    if arch == "starcoder2":  # llama.cpp's starcoder2 graph has no sliding window
        expected = dataclasses.replace(expected, sliding_window=None, layer_types=())
    assert cfg == expected
    if hf_cfg.rope_scaling.kind == "longrope":
        hf_rs, rs = hf_cfg.rope_scaling, cfg.rope_scaling
        np.testing.assert_allclose(rs.long_factor, hf_rs.long_factor, rtol=1e-6)
        np.testing.assert_allclose(rs.short_factor, hf_rs.short_factor, rtol=1e-6)
        assert rs.attention_factor == pytest.approx(hf_rs.attention_factor, rel=1e-6)
    flat_hf, tree_hf = jax.tree_util.tree_flatten(hf_params)
    flat, tree = jax.tree_util.tree_flatten(params)
    assert tree == tree_hf
    for a, b in zip(flat, flat_hf, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


# --- packed weights: fused tensors split packed, MoE experts packed -----------------------------------


def test_gguf_packed_3d_experts_split_exactly(tiny, tmp_path):
    """Q8_0 3-D expert tensors loaded packed: split per expert and restacked `[L, E, out, in]` without
    unpacking, equal to the same file dequantized at load."""
    folder, model = tiny("mixtral")
    path = tmp_path / "q8.gguf"
    write_llama_cpp_gguf(model, folder, path, "mixtral", variant="q8-experts")
    reader = open_gguf(path)
    cfg = gguf_config(reader, read_metadata(reader), path)
    packed = checkpoint.load_params(open_gguf_tensors(reader, cfg, path, packed=True), cfg, np.float32)
    floats = checkpoint.load_params(open_gguf_tensors(reader, cfg, path), cfg, np.float32)
    for key in ("gate_proj", "up_proj", "down_proj"):
        qt = packed["layers"]["mlp"][key]["weight"]
        assert isinstance(qt, QuantizedTensor) and qt.fmt == "Q8_0" and qt.lead_shape == (2, 4)
        want = floats["layers"]["mlp"][key]["weight"]
        np.testing.assert_allclose(np.asarray(dequantize(qt)), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_take_keeps_packed_rows_exact(fmt):
    w = np.random.default_rng(0).normal(size=(3, 48, 256)).astype(np.float32)
    qt = quantize(w, fmt)
    full = np.asarray(dequantize(qt))
    rows = take(qt[1], slice(8, 40))
    assert isinstance(rows, QuantizedTensor) and rows.shape == (32, 256)
    np.testing.assert_array_equal(np.asarray(dequantize(rows)), full[1, 8:40])
    np.testing.assert_array_equal(np.asarray(dequantize(take(qt, 2))), full[2])


@pytest.mark.parametrize("name", ["mixtral", "phi3-longrope-window"])
def test_isq_packed_experts_and_fused_splits(name, tiny, tmp_path_factory):
    """ISQ packs Mixtral's experts (stacked `[L, E, out, in]`, dequantized per layer before the grouped
    matmul) and Phi-3's fused q/k/v / gate-up (packed, then split by rows); the router stays float."""
    folder, _ = tiny(name)
    save_tiny_tokenizer(folder, 256)
    packed = load_model(str(folder), isq="8")
    layers = packed.params["layers"]
    if name == "mixtral":
        assert isinstance(layers["mlp"]["gate_proj"]["weight"], QuantizedTensor) and layers["mlp"][
            "gate_proj"
        ]["weight"].shape == (
            2,
            4,
            128,
            64,
        )
        assert not isinstance(layers["mlp"]["router"]["weight"], QuantizedTensor)
    else:
        assert isinstance(layers["attn"]["k_proj"]["weight"], QuantizedTensor) and layers["attn"]["k_proj"][
            "weight"
        ].shape == (2, 32, 64)
    unpacked = jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QuantizedTensor) else x,
        packed.params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    ids = np.random.default_rng(2).integers(0, 256, 24).tolist()
    ours = PagedRun(packed.config, packed.params, block_size=8, num_blocks=8).feed(ids)
    exact = PagedRun(packed.config, unpacked, block_size=8, num_blocks=8).feed(ids)
    cfg, params = load_params(folder)
    floats = PagedRun(cfg, params, block_size=8, num_blocks=8).feed(ids)
    assert relative_error(ours, exact) <= 1e-5
    assert relative_error(ours, floats) <= 5e-2
