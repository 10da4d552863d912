"""LoRA in the model against peft: prompt logits of every position for each adapter, for a batch mixing
both adapters and a row without one (Llama on the unrolled layer loop, Qwen2 on the stacked one), and
`merge_and_unload()`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrs.loading import load_model
from jaxrs.lora.config import LoraConfig
from jaxrs.lora.slots import LoraSlots
from jaxrs.lora.weight import bind_slots
from jaxrs.models.decoder import merge, unstack_layers
from jaxrs.models.layers import AttentionMetadata, allocate_kv_cache
from jaxrs.ops import Kernels
from tests.conftest import relative_error, save_tiny_tokenizer
from tests.lora_models import build, peft_model

PROMPT = 24


def batch_logits(cfg, params, prompts: np.ndarray, slots: list[int], kernels=Kernels()) -> np.ndarray:
    """Logits `[rows, T, vocab]` of a batch of prompts through the paged cache, row i with adapter slot i."""
    rows, t = prompts.shape
    block = 8
    per_row = -(-t // block)
    kv = allocate_kv_cache(cfg, rows * per_row, block, jnp.float32)
    tables = np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)[:, ::-1].copy()
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t))
    slot_map = np.take_along_axis(tables, pos // block, axis=1) * block + pos % block
    meta = AttentionMetadata(pos, slot_map.astype(np.int32), tables, np.full(rows, t, np.int32))
    return np.asarray(
        _logits(params, jnp.asarray(slots, jnp.int32), jnp.asarray(prompts), meta, kv, cfg, kernels)
    )


@functools.partial(jax.jit, static_argnums=(5, 6))
def _logits(params, slots, tokens, meta, kv, cfg, kernels):
    model = merge(bind_slots(params, slots), cfg)
    hidden, _ = model(tokens, meta, kv, kernels)
    return model.logits(hidden, kernels)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    base, adapters = build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, base, adapters, peft_model(base, adapters)


def test_mixed_batch_equals_peft(setup):
    family, base, adapters, ref = setup
    loop = "unrolled" if family == "llama" else "scan"
    loaded = load_model(str(base), dtype="float32")
    config = LoraConfig(tuple((n, str(p)) for n, p in adapters.items()), max_loras=3, max_lora_rank=8)
    slots = LoraSlots(config, loaded.config, jnp.float32)
    slots.attach(loaded.params)
    if loop == "unrolled":
        unstack_layers(loaded.params)
    prompts = np.random.default_rng(0).integers(0, 256, (4, PROMPT)).astype(np.int32)
    names = ["alpha", "beta", None, "beta"]
    ours = batch_logits(loaded.config, loaded.params, prompts, [slots.slot_of(n) for n in names])
    with torch.no_grad():
        mixed = ref(torch.tensor(prompts.astype(np.int64)), adapter_names=[n or "__base__" for n in names])
    mixed = mixed.logits.numpy()
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with ref.disable_adapter():
                    alone = ref(torch.tensor(prompts[i : i + 1].astype(np.int64))).logits[0].numpy()
            else:
                ref.set_adapter(name)
                alone = ref(torch.tensor(prompts[i : i + 1].astype(np.int64))).logits[0].numpy()
        assert relative_error(ours[i], alone) <= 1e-4, name
        assert relative_error(mixed[i], alone) <= 1e-4, name
    # the adapters change the logits: a test that cannot tell the base from an adapter proves nothing
    assert relative_error(ours[1], ours[2]) > 1e-2


def test_equals_merged_model(setup, tmp_path):
    family, base, adapters, _ = setup
    if family != "llama":
        pytest.skip("one family is enough for the merged model")
    merged_ref = peft_model(base, {"beta": adapters["beta"]}).merge_and_unload()
    merged_ref.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 256)
    merged = load_model(str(tmp_path), dtype="float32")
    loaded = load_model(str(base), dtype="float32")
    config = LoraConfig((("beta", str(adapters["beta"])),), max_loras=2, max_lora_rank=8)
    slots = LoraSlots(config, loaded.config, jnp.float32)
    slots.attach(loaded.params)
    prompts = np.random.default_rng(1).integers(0, 256, (1, PROMPT)).astype(np.int32)
    ours = batch_logits(loaded.config, loaded.params, prompts, [slots.slot_of("beta")])
    theirs = batch_logits(merged.config, merged.params, prompts, [-1])
    assert relative_error(ours, theirs) <= 1e-4
