"""LoRA on Mixtral's experts against peft (transformers 5 fuses the experts into `gate_up_proj` and
`down_proj` tensors, which peft adapts through `target_parameters`): an adapter peft makes from
`target_modules=["w1", "w2", "w3"]` (converted to the fused parameters, gate/up block-diagonal), one made
with `target_parameters` directly (rsLoRA), and one in the per-expert layout older transformers wrote
(`block_sparse_moe.experts.N.w1`, which peft converts on load). Greedy tokens and log-probabilities
equal `PeftModel`'s for each adapter alone and in one batch mixing all three and the base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxrs.errors import JaxrsError
from jaxrs.llm import LLM
from jaxrs.loading import load_model
from jaxrs.lora.adapter import read_adapter
from tests.lora_models import peft_model, save_adapter, tiny_base
from tests.test_lora_engine import GREEDY, assert_matches, peft_greedy

PROMPTS = [np.random.default_rng(i).integers(3, 256, 12 + 5 * i).tolist() for i in range(2)]
EXPERTS = dict(num_experts=4, hidden=64, ffn=128)


def per_expert_adapter(base_path, out, seed: int, r: int = 4):
    """The per-expert layout (transformers 4 Mixtral): A/B for every expert's w1, w2, w3."""
    from safetensors.torch import save_file

    out.mkdir()
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (64, 128), "w3": (64, 128), "w2": (128, 64)}  # (in, out)
    tensors = {}
    for layer in range(2):
        for e in range(EXPERTS["num_experts"]):
            for w, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.1
    save_file(tensors, out / "adapter_model.safetensors")
    config = dict(
        peft_type="LORA",
        r=r,
        lora_alpha=2 * r,
        target_modules=["w1", "w2", "w3"],
        base_model_name_or_path=str(base_path),
        task_type="CAUSAL_LM",
    )
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-experts")
    base = root / "base"
    tiny_base("mixtral", base)
    adapters = {
        "w123": save_adapter(
            base, root / "w123", 1, r=4, lora_alpha=8, target_modules=["w1", "w2", "w3", "q_proj"]
        ),
        "params": save_adapter(
            base,
            root / "params",
            2,
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        "per_expert": per_expert_adapter(base, root / "per_expert", 3),
    }
    return base, adapters


def test_expert_adapters_equal_peft_alone_and_mixed(models):
    base, adapters = models
    names = [*adapters, None]
    want = {}
    for name, path in adapters.items():
        ref = peft_model(base, {name: path})
        want[name] = [peft_greedy(ref, p, name) for p in PROMPTS]
    want[None] = [peft_greedy(ref, p, None) for p in PROMPTS]
    for name in adapters:  # each adapter changes the experts' output
        assert np.abs(want[name][0][1][0] - want[None][0][1][0]).max() > 1e-2, name

    llm = LLM(
        str(base),
        lora_adapters=adapters,
        max_loras=3,
        max_lora_rank=8,
        kv_cache_tokens=1024,
        kv_cache_dtype="float32",
    )
    for name in names:  # alone
        assert_matches(llm.generate(PROMPTS[0], GREEDY, lora=name, use_tqdm=False)[0], want[name][0])
    # one batch: both prompts under every adapter and the base, interleaved
    pairs = [(p, n, w) for n in names for p, w in zip(PROMPTS, want[n], strict=True)][::-1]
    outs = llm.generate([p for p, _, _ in pairs], GREEDY, lora=[n for _, n, _ in pairs], use_tqdm=False)
    for out, (_, _, w) in zip(outs, pairs, strict=True):
        assert_matches(out, w)


def test_expert_adapter_rank_is_checked(models):
    base, adapters = models
    cfg = load_model(str(base), dtype="float32").config
    assert read_adapter("params", adapters["params"], cfg, 8).rank == 8
    with pytest.raises(JaxrsError, match="max_lora_rank is 4"):
        read_adapter("params", adapters["params"], cfg, 4)


def test_expert_adapter_that_does_not_fit_is_named(models, tmp_path):
    """An expert index past the model's experts, or a fused tensor of no expert parameter's shape."""
    from safetensors.numpy import load_file, save_file

    base, adapters = models
    cfg = load_model(str(base), dtype="float32").config
    for source, rename, match in [
        ("per_expert", lambda k: k.replace("experts.3.", "experts.9."), "for 4 experts"),
        ("params", lambda k: k, "does not fit this model"),
    ]:
        folder = tmp_path / source
        folder.mkdir()
        tensors = load_file(str(adapters[source] / "adapter_model.safetensors"))
        if source == "params":  # drop one input column of every A
            tensors = {k: v[:, :-1] if ".lora_A." in k else v for k, v in tensors.items()}
        save_file({rename(k): v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text((adapters[source] / "adapter_config.json").read_text())
        with pytest.raises(JaxrsError, match=match):
            read_adapter(source, folder, cfg, 8)


def test_mixtral_targets_are_the_experts_and_attention_not_the_router(models):
    from jaxrs.lora.adapter import adaptable_targets

    base, _ = models
    targets = adaptable_targets(load_model(str(base), dtype="float32").config)
    assert targets["block_sparse_moe.experts.{e}.w1"] == (("mlp", "gate_proj"), (4, 128, 64))
    assert targets["block_sparse_moe.experts.{e}.w2"] == (("mlp", "down_proj"), (4, 64, 128))
    assert "self_attn.q_proj" in targets and not any(t == ("mlp", "router") for t, _ in targets.values())
