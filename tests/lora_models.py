"""Tiny random base models and random peft LoRA adapters (non-zero B), built offline, for the LoRA tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Two adapters of different rank, scaling and targets: the second leaves k/o/gate/up alone and uses rsLoRA.
ADAPTERS = {
    "alpha": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "beta": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}

TARGETS = ["q_proj", "v_proj", "down_proj"]  # the X-LoRA experts'


def tiny_base(family: str, path: Path, seed: int = 0):
    """A 2-layer random model of `family` ("llama", "qwen2", "phi3": fused qkv and gate_up, or "mixtral":
    4 experts, top 2) saved with
    a tokenizer; returns it (eval)."""
    from transformers import LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config

    if family == "mixtral":
        config = MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    else:
        extra = (
            {"pad_token_id": 0} if family == "phi3" else {}
        )  # Phi-3's default pad id is past SMALL's vocab
        classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}
        config = classes[family](**SMALL, tie_word_embeddings=False, **extra)
    model = save_tiny_hf_model(config, path, seed=seed)
    save_tiny_tokenizer(path, SMALL["vocab_size"])
    return model


def save_adapter(base_path: Path, out: Path, seed: int, **lora) -> Path:
    """A peft LoRA adapter over the model at `base_path` with random A and B, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**lora, lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


def peft_model(base_path: Path, adapters: dict[str, Path], base_state: dict | None = None):
    """A `PeftModel` over a fresh copy of the base (its weights replaced by `base_state` if given)
    holding every adapter by name (eval, f32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if base_state is not None:
        missing = base.load_state_dict(base_state, strict=False).missing_keys
        assert not missing, missing
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def build(family: str, root: Path) -> tuple[Path, dict[str, Path]]:
    """The base folder and the adapters' folders under `root`."""
    base = root / "base"
    tiny_base(family, base)
    adapters = {
        name: save_adapter(base, root / name, seed=i + 1, **lora)
        for i, (name, lora) in enumerate(ADAPTERS.items())
    }
    return base, adapters


def build_xlora(root: Path):
    """A tiny random Llama, three random LoRA experts and a random X-LoRA classifier over them (layerwise
    scalings, top-2, a softmax temperature, a global weight), saved under `root`; returns the base folder,
    the X-LoRA folder and peft's `XLoraModel` (use_cache off)."""
    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = root / "base"
    tiny_base("llama", base)
    experts = {
        str(i): str(save_adapter(base, root / f"e{i}", seed=i + 1, r=4, lora_alpha=8, target_modules=TARGETS))
        for i in range(3)
    }
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        adapters=experts,
        xlora_depth=2,
        xlora_size=32,
        xlora_dropout_p=0.0,
        layerwise_scalings=True,
        top_k_lora=2,
        softmax_temperature=0.7,
        global_scaling_weight=1.5,
    )
    ref = get_peft_model(model, config).eval()
    torch.manual_seed(0)
    classifier = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "internal_xlora_classifier" in name:
                p.normal_(0.0, 0.5)
                classifier[name] = p.detach().clone()
    folder = root / "xlora"
    ref.save_pretrained(folder)
    save_file(classifier, str(folder / "xlora_classifier.safetensors"))  # peft saves no classifier weights
    return base, folder, ref
