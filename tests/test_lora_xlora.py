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


def test_original_layout_and_ordering_file(tmp_path):
    """The original xlora layout (`xlora_config.json`, `xlora_classifier.safetensors`) and mistral.rs's
    ordering file, whose `order` reorders the experts (the classifier's outputs follow it)."""
    from safetensors.numpy import save_file

    for name in ("math", "code"):
        (tmp_path / name).mkdir()
    config = {"adapters": {"math": "math", "code": "code"}, "layerwise_scalings": True, "top_k_lora": 1}
    (tmp_path / "xlora_config.json").write_text(json.dumps(config))
    weights = {"internal_xlora_classifier.layers.0.weight": np.ones((2, 4), np.float32)}
    weights["internal_xlora_classifier.layers.0.bias"] = np.zeros(2, np.float32)
    save_file(weights, str(tmp_path / "xlora_classifier.safetensors"))
    spec = read_xlora(tmp_path)
    assert [n for n, _ in spec.adapters] == ["math", "code"] and spec.top_k_lora == 1
    order = tmp_path / "ordering.json"
    order.write_text(json.dumps({"order": ["code", "math"], "layers": {}}))
    spec = read_xlora(tmp_path, order)
    assert spec.adapters == (("code", str(tmp_path / "code")), ("math", str(tmp_path / "math")))
    order.write_text(json.dumps({"order": ["code", "bio"]}))
    with pytest.raises(JaxrsError, match="orders"):
        read_xlora(tmp_path, order)
    config["scaling_pass_value"] = 0.5
    (tmp_path / "xlora_config.json").write_text(json.dumps(config))
    with pytest.raises(JaxrsError, match="scaling_pass_value"):
        read_xlora(tmp_path)
