"""Single-file FLUX transformers in Black Forest Labs' key names (`flux1-dev.safetensors`): a getter that
answers diffusers names, splitting the fused projections and swapping the output modulation's halves
(BFL stores shift then scale, diffusers scale then shift)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from jaxrs.errors import ModelLoadError
from jaxrs.loading.safetensors_file import SafetensorsFile

# diffusers name (regex over the part after the block index) -> (BFL name, part of a fused tensor)
DOUBLE = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE = {
    "norm.linear": ("modulation.lin", None),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def bfl_source(name: str) -> tuple[str, int | None, bool]:
    """The BFL tensor a diffusers transformer name reads: (name, part of the fused rows, swap halves)."""
    module, kind = name.rsplit(".", 1)
    block = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if block:
        group, i, rest = block.groups()
        prefix = f"{'double' if group == 'transformer_blocks' else 'single'}_blocks.{i}."
        norms, linears = (DOUBLE_NORMS, DOUBLE) if group == "transformer_blocks" else (SINGLE_NORMS, SINGLE)
        if rest in norms and kind == "weight":
            return prefix + norms[rest] + ".scale", None, False
        if rest in linears:
            bfl, part = linears[rest]
            return f"{prefix}{bfl}.{kind}", part, False
    elif module in TOP:
        return f"{TOP[module]}.{kind}", None, module == "norm_out.linear"
    raise KeyError(name)


def bfl_getter(path: str, dim: int) -> Callable[[str], np.ndarray]:
    """A getter of diffusers-named transformer tensors over a BFL single file (`dim`: the hidden size;
    fused projections split into rows of `dim`, the single blocks' MLP part taking the rest)."""
    st = SafetensorsFile(path)
    prefix = next((p for p in PREFIXES if any(n.startswith(p) for n in st.names)), "")

    def get(name: str) -> np.ndarray:
        try:
            bfl, part, swap = bfl_source(name)
            x = st.get(prefix + bfl)
        except KeyError:
            raise ModelLoadError(path, f"no tensor for {name} in this FLUX single file") from None
        if part is not None:
            x = x[part * dim : (part + 1) * dim] if part < 3 else x[3 * dim :]
        if swap:
            half = x.shape[0] // 2
            x = np.concatenate([x[half:], x[:half]])
        return x

    return get
