"""X-LoRA against peft's `XLoraModel` (use_cache=False) on a tiny random Llama with three random LoRA
experts and a random two-layer classifier (layerwise scalings, top-2, a softmax temperature, a global
weight): the scalings equal `get_latest_scalings()` and the logits equal peft's over a prompt and 8
greedy tokens; two sequences batched equal each alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxrs.errors import JaxrsError
from jaxrs.loading import load_model
from jaxrs.lora.xlora import XLoraModel, read_xlora
from tests.conftest import relative_error
from tests.lora_models import TARGETS, build_xlora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_xlora(tmp_path_factory.mktemp("xlora"))


def peft_run(ref, ids: list[list[int]]):
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    return logits, ref.get_latest_scalings().numpy()


def test_scalings_and_logits_equal_peft(models):
    base, folder, ref = models
    loaded = load_model(str(base), dtype="float32")
    ours = XLoraModel(loaded.config, loaded.params, read_xlora(folder), max_lora_rank=8)
    ids = list(np.random.default_rng(0).integers(3, 256, 12))
    for _ in range(9):  # the prompt, then 8 greedy tokens (each side from its own logits)
        logits, scalings = ours.run([ids]), ours.latest_scalings
        their_logits, their_scalings = peft_run(ref, [ids])
        assert np.abs(scalings - their_scalings).max() <= 1e-5
        assert relative_error(logits, their_logits) <= 1e-4
        assert int(logits[0, -1].argmax()) == int(their_logits[0, -1].argmax())
        ids.append(int(logits[0, -1].argmax()))
    assert scalings.shape == (1, len(ids) - 1, 2 * len(TARGETS), 3)
    # the experts matter: top-2 of 3 leaves a zero weight per token, and logits differ from the base
    with torch.no_grad(), ref.disable_adapter():
        plain = ref(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits.numpy()
    assert relative_error(logits, plain) > 1e-2

    other = list(np.random.default_rng(1).integers(3, 256, len(ids) - 1))
    batched = ours.run([ids[:-1], other])
    assert relative_error(batched[0], ours.run([ids[:-1]])[0]) <= 1e-5
    assert relative_error(batched[1], ours.run([other])[0]) <= 1e-5


def test_bad_folders(tmp_path):
    with pytest.raises(JaxrsError, match="no adapter_config.json"):
        read_xlora(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(JaxrsError, match="not XLORA"):
        read_xlora(tmp_path)
