"""The real SmolLM2-135M-Instruct GGUF against transformers loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrs.errors import ModelLoadError
from jaxrs.loading import checkpoint
from jaxrs.loading.gguf_file import gguf_config, open_gguf_tensors, unpermute_rope
from jaxrs.loading.gguf_reader import open_gguf, read_metadata
from jaxrs.loading.hf_folder import load_hf_config, open_hf_tensors
from tests.conftest import relative_error
from tests.paged import PagedRun

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def load_gguf_params(path):
    reader = open_gguf(path)
    cfg = gguf_config(reader, read_metadata(reader), path)
    return cfg, checkpoint.load_params(open_gguf_tensors(reader, cfg, path, packed=False), cfg, np.float32)


@pytest.fixture(scope="module")
def reference(demo_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=demo_gguf.name)
    tok = AutoTokenizer.from_pretrained(demo_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, dtype=torch.float32, **kwargs).eval()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return model, list(ids)


@pytest.fixture(scope="module")
def ours(demo_gguf):
    return load_gguf_params(demo_gguf)


def test_config_from_metadata(ours):
    cfg, _ = ours
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192


def test_prompt_logits_match_transformers(ours, reference):
    cfg, params = ours
    model, ids = reference
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    logits = PagedRun(cfg, params, num_blocks=64, seed=5).feed(ids)
    err = relative_error(logits, theirs)
    print(f"SmolLM2 GGUF prompt logits: max relative error {err:.2e} over {len(ids)} tokens")
    assert err <= 1e-4


def test_32_greedy_tokens_match_transformers(ours, reference):
    cfg, params = ours
    model, ids = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    theirs = out[0, len(ids) :].tolist()
    assert len(theirs) == 32  # no early EOS: the comparison covers all 32 tokens
    run = PagedRun(cfg, params, num_blocks=64, seed=6)
    logits = run.feed(ids)[-1]
    mine = []
    for _ in range(32):
        mine.append(int(np.argmax(logits)))
        logits = run.feed([mine[-1]])[-1]
    assert mine == theirs


def test_hf_folder_copy_gives_same_logits(ours, reference, tmp_path):
    """The transformers model (from the GGUF) saved as sharded safetensors loads to the same logits."""
    cfg, params = ours
    model, ids = reference
    write_sharded_hf_folder(model, tmp_path)
    hf_cfg = load_hf_config(tmp_path)
    hf_params = checkpoint.load_params(
        open_hf_tensors(tmp_path, checkpoint.hf_weight_names(hf_cfg)), hf_cfg, np.float32
    )
    a = PagedRun(cfg, params, num_blocks=64).feed(ids[:20])
    b = PagedRun(hf_cfg, hf_params, num_blocks=64).feed(ids[:20])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())


def write_sharded_hf_folder(model, folder, shards: int = 2):
    """config.json + `shards` safetensors files + model.safetensors.index.json (transformers refuses to
    save a GGUF-loaded model itself)."""
    import json

    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 8, 5))
    heads = 3
    # llama.cpp's convert_hf_to_gguf.py `permute` (HF rotate-half rows -> interleaved rows):
    permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope(permuted, heads), w)
    assert not np.array_equal(permuted, w)


def test_truncated_gguf_is_a_clear_error(demo_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(demo_gguf.read_bytes()[:40_000_000])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: truncated"):
        open_gguf(cut)
