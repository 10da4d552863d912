"""Loading FLUX pipelines: BFL single-file transformer names (checked against diffusers' own converter),
a single file loading to the same parameters as the folder, ISQ of the transformer blocks, bad folders."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxrs.errors import ModelLoadError
from jaxrs.images.bfl_names import bfl_getter, bfl_source
from jaxrs.images.flux_transformer import rope_tables
from jaxrs.images.loading import load_pipeline
from jaxrs.images.pipeline import position_ids
from jaxrs.quant import QuantizedTensor
from tests.flux_tiny import save_pipeline, tiny_transformer


def to_bfl(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A diffusers transformer state dict in BFL names (fused parts concatenated in order)."""
    parts: dict[str, dict[int | None, np.ndarray]] = {}
    for name, x in state.items():
        bfl, part, swap = bfl_source(name)
        if swap:
            x = np.concatenate([x[x.shape[0] // 2 :], x[: x.shape[0] // 2]])
        parts.setdefault(bfl, {})[part] = x
    return {
        k: np.concatenate([v[p] for p in sorted(v)]) if None not in v else v[None] for k, v in parts.items()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("flux"), dev=True)


def test_bfl_names_match_the_diffusers_converter(tmp_path):
    """diffusers' converter hard-codes FLUX's width (3072): fused rows are that wide, columns tiny."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dim, rng = 3072, np.random.default_rng(0)
    rows = {"qkv": 3 * dim, "linear1": 7 * dim, "adaLN_modulation": 2 * dim}
    names = [
        n
        for i in range(2)
        for n in (
            *(
                f"transformer_blocks.{i}.{m}"
                for m in ("norm1.linear", "attn.to_q", "attn.add_k_proj", "ff.net.2")
            ),
            *(
                f"single_transformer_blocks.{i}.{m}"
                for m in ("attn.to_q", "proj_mlp", "proj_out", "norm.linear")
            ),
        )
    ]
    full = tiny_transformer(True).state_dict()  # every other module name, from a real model
    diffusers_names = {k.rsplit(".", 1)[0] for k in full if "blocks.0." in k or "blocks." not in k}
    diffusers_names |= {k.replace("blocks.0.", "blocks.1.") for k in diffusers_names} | set(names)
    bfl = {}
    for module in sorted(diffusers_names):
        for kind in (
            ("weight", "bias")
            if "norm_q" not in module and "norm_k" not in module and "norm_added" not in module
            else ("weight",)
        ):
            key = bfl_source(f"{module}.{kind}")[0]
            n = next((r for s, r in rows.items() if s in key), 4)
            bfl[key] = rng.standard_normal(
                (n, 2) if kind == "weight" and not key.endswith("scale") else (n,)
            ).astype(np.float32)
    path = tmp_path / "flux.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, str(path))
    converted = convert_flux_transformer_checkpoint_to_diffusers({k: torch.tensor(v) for k, v in bfl.items()})
    get = bfl_getter(str(path), dim)
    assert len(converted) > 40
    for name, x in converted.items():
        np.testing.assert_array_equal(get(name), x.numpy(), err_msg=name)


def test_single_file_loads_the_same_transformer(folder, tmp_path):
    state = {k: v.numpy() for k, v in tiny_transformer(True).state_dict().items()}
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(to_bfl(state), str(path))
    a = load_pipeline(folder).transformer.params
    b = load_pipeline(folder, transformer_file=path).transformer.params
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_isq_packs_the_block_matrices(folder):
    ref, packed = load_pipeline(folder), load_pipeline(folder, isq="Q8_0")
    leaves = jax.tree.leaves(packed.transformer.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    assert sum(isinstance(x, QuantizedTensor) for x in leaves) == 14 + 6  # every stacked block matrix
    rng = np.random.default_rng(0)
    latents, txt = rng.standard_normal((1, 8, 16), np.float32), rng.standard_normal((1, 5, 32), np.float32)
    args = (
        rng.standard_normal((1, 24), np.float32),
        np.array([0.5], np.float32),
        np.array([3.5], np.float32),
    )
    cos, sin = rope_tables(position_ids(5, 8, 4), (4, 6, 6))
    want = np.asarray(ref.transformer.module()(latents, txt, *args, cos, sin))
    got = np.asarray(packed.transformer.module()(latents, txt, *args, cos, sin))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_bad_folders_are_load_errors(folder, tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="transformer/"):
        load_pipeline(tmp_path)
