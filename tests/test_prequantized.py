"""Pre-quantized folders (`jaxrs quantize`): saved ISQ models reload bit-identical, without quantizing."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxrs.loading.isq
import jaxrs.quant
from jaxrs.cli import main
from jaxrs.errors import JaxrsError, ModelLoadError
from jaxrs.loading import load_model, resolve_source
from jaxrs.loading.prequantized import save_quantized
from jaxrs.loading.tokenizer_files import check_same_tokenizer, save_tokenizer
from jaxrs.quant import QuantizedTensor
from jaxrs.tokenizer import Tokenizer
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config
from tests.paged import PagedRun

TINY = tiny_llama_config()
IDS = list(range(3, 40))
is_packed = lambda x: isinstance(x, QuantizedTensor)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-prequantized")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return folder


@pytest.fixture(scope="module")
def saved_q4k(tiny, tmp_path_factory):
    """(in-memory ISQ model, folder it was saved to) for Q4K, in its formats as `jaxrs quantize` saves."""
    loaded = load_model(str(tiny), isq="Q4K", device_layout=False)
    out = tmp_path_factory.mktemp("saved") / "q4k"
    save_quantized(loaded, out)
    return loaded, out


def forbid_quantizing(monkeypatch) -> None:
    """From here on, any quantization fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pre-quantized model was quantized again")

    monkeypatch.setattr(jaxrs.loading.isq, "quantize", refuse)
    monkeypatch.setattr(jaxrs.quant, "quantize", refuse)


def assert_same_params(ours: dict, ref: dict) -> None:
    """Same tree structure, same formats, bit-identical arrays of the same dtypes."""
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(
        jax.tree.leaves(ours, is_leaf=is_packed), jax.tree.leaves(ref, is_leaf=is_packed), strict=True
    ):
        assert type(a) is type(b)
        if is_packed(a):
            assert (a.fmt, a.out_in) == (b.fmt, b.out_in)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert isinstance(x, jax.Array) and x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def logits(loaded) -> np.ndarray:
    return PagedRun(loaded.config, loaded.params, num_blocks=16).feed(IDS)


@pytest.mark.parametrize("fmt", ["Q4K", "8", "hqq4"])
def test_saved_model_reloads_bit_identical_without_quantizing(tiny, tmp_path, fmt, monkeypatch):
    in_memory = load_model(str(tiny), isq=fmt)
    save_quantized(in_memory, tmp_path / fmt)
    forbid_quantizing(monkeypatch)
    loaded = load_model(str(tmp_path / fmt))
    assert loaded.config == in_memory.config and hash(loaded.config) == hash(in_memory.config)
    assert is_packed(loaded.params["layers"]["attn"]["q_proj"]["weight"])
    assert_same_params(loaded.params, in_memory.params)
    np.testing.assert_array_equal(logits(loaded), logits(in_memory))


def test_folder_is_recognized_and_dtype_casts_only_float_arrays(saved_q4k, monkeypatch):
    in_memory, out = saved_q4k
    forbid_quantizing(monkeypatch)
    assert resolve_source(str(out)) == ("quantized", out)
    half = load_model(str(out), dtype="bfloat16", device_layout=False)
    assert half.params["layers"]["input_norm"]["weight"].dtype == jnp.bfloat16
    assert half.params["embed"]["weight"].fmt == "Q8_0"  # packed by ISQ, so kept as it is
    packed, ref = (
        half.params["layers"]["mlp"]["down_proj"]["weight"],
        in_memory.params["layers"]["mlp"]["down_proj"]["weight"],
    )
    for name, array in packed.arrays.items():  # packed fields keep their own dtypes and bytes
        np.testing.assert_array_equal(np.asarray(array), np.asarray(ref.arrays[name]))
    assert half.generation_config == in_memory.generation_config


def test_isq_on_a_quantized_folder_is_an_error(saved_q4k):
    with pytest.raises(JaxrsError, match="already quantized"):
        load_model(str(saved_q4k[1]), isq="Q8_0")


def test_tokenizer_round_trips(saved_q4k):
    in_memory, out = saved_q4k
    ours, ref = load_model(str(out)).tokenizer, in_memory.tokenizer
    for text in ["w3 w17 w200", "<s> w5 </s> w9", "unknown w4"]:
        assert ours.encode(text) == ref.encode(text)
    chat = [{"role": "user", "content": "w7 w8"}]
    assert ours.chat_template == ref.chat_template
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat)
    assert (ours.eos_token_ids, ours.bos_token_id, ours.add_bos) == (
        ref.eos_token_ids,
        ref.bos_token_id,
        ref.add_bos,
    )


def test_extra_stop_ids_go_into_generation_config(tiny, tmp_path):
    """A GGUF tokenizer stops on eos and eot; tokenizer_config.json names one, generation_config the rest."""
    base = Tokenizer.from_hf_folder(tiny)
    tok = Tokenizer(
        backend=base.backend,
        bos_token_id=1,
        eos_token_ids=[2, 5, 1],
        unk_token_id=0,
        add_bos=True,
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    gen = save_tokenizer(tok, tmp_path, {"temperature": 0.7})
    assert gen == {"temperature": 0.7, "eos_token_id": [2, 5, 1]}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    check_same_tokenizer(tok, Tokenizer.from_hf_folder(tmp_path), tmp_path)


def test_cli_quantize_then_llm_generates(tiny, tmp_path, capsys, monkeypatch):
    from jaxrs.engine.sampling import SamplingParams
    from jaxrs.llm import LLM

    out = tmp_path / "q8"
    assert (
        main(["--log-level", "WARNING", "quantize", "--model", str(tiny), "--isq", "Q8_0", "--out", str(out)])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert {p.name for p in out.iterdir()} >= {"jaxrs_config.json", "model.safetensors", "tokenizer.json"}
    forbid_quantizing(monkeypatch)
    held = load_model(str(out), device_layout=False).params  # the folder holds the format itself
    assert held["layers"]["mlp"]["gate_proj"]["weight"].fmt == "Q8_0"
    llm = LLM(str(out), kv_cache_mb=4, max_num_seqs=2)  # on CPU, served in its layout
    served = "Q8F" if jax.default_backend() == "cpu" else "Q8_0"
    assert llm.model.params["layers"]["mlp"]["gate_proj"]["weight"].fmt == served
    result = llm.generate([[3, 4, 5, 6]], SamplingParams(temperature=0, max_tokens=5))
    assert len(result[0].token_ids) == 5


def test_cli_quantize_errors_are_one_line(tiny, saved_q4k, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["--log-level", "WARNING", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "--isq" in error("quantize", "--model", str(tiny), "--out", str(tmp_path / "x"))
    assert "not empty" in error("quantize", "--model", str(tiny), "--isq", "8", "--out", str(tiny))
    assert "already quantized" in error("run", "--model", str(saved_q4k[1]), "--isq", "8", "--prompt", "w3")


def broken_copy(saved, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    return folder


def test_missing_weights_file_names_it(saved_q4k, tmp_path):
    folder = broken_copy(saved_q4k[1], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors: no such file"):
        load_model(str(folder))


def test_missing_field_names_the_file_and_tensor(saved_q4k, tmp_path):
    folder = broken_copy(saved_q4k[1], tmp_path)
    file = folder / "model.safetensors"
    with safe_open(file, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "layers.attn.q_proj.weight.sc"}
    save_file(tensors, file, metadata=meta)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: tensor 'layers\.attn\.q_proj\.weight\.sc' is missing"
    ):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("jaxrs_config.json", "{not json", "invalid JSON"),
        ("jaxrs_config.json", '{"format": "other"}', "not a jaxrs quantized model"),
        ("model.safetensors", "garbage", "unreadable safetensors file"),
    ],
)
def test_damaged_files_give_a_load_error_naming_them(saved_q4k, tmp_path, file, content, problem):
    folder = broken_copy(saved_q4k[1], tmp_path)
    (folder / file).write_text(content)
    with pytest.raises(ModelLoadError, match=problem) as info:
        load_model(str(folder))
    assert info.value.path == str(folder / file)


@pytest.mark.slow
def test_demo_model_q8_saved_and_reloaded_generates_the_same_tokens(demo_gguf, tmp_path):
    from jaxrs.engine.sampling import SamplingParams
    from jaxrs.llm import LLM

    out = tmp_path / "demo-q8"
    save_quantized(load_model(str(demo_gguf), isq="Q8_0"), out)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    reloaded = LLM(str(out), kv_cache_mb=16, max_num_seqs=2)
    ours = reloaded.generate([reloaded.chat_prompt_ids(prompt)], greedy)[0]
    in_memory = LLM(str(demo_gguf), isq="Q8_0", kv_cache_mb=16, max_num_seqs=2)
    ref = in_memory.generate([in_memory.chat_prompt_ids(prompt)], greedy)[0]
    assert ours.token_ids == ref.token_ids
    assert "Paris" in ours.text


def rewrite_tree(file, rename, version: str | None = None) -> dict:
    """Rewrite a parameter file's tensor names and metadata paths with `rename(path) -> path | None`
    (None drops the parameter), keeping everything else; returns the old metadata."""
    from jaxrs.loading.param_file import TREE_KEY

    with safe_open(file, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    leaves, out = json.loads(meta[TREE_KEY]), {}
    new_leaves = {}
    for name, entry in leaves.items():
        path = rename(entry["path"])
        if path is None:
            continue
        new = ".".join(path)
        new_leaves[new] = entry | {"path": path}
        fields = (
            [f".{field}" for field in jaxrs.quant.FORMATS[entry["format"]].field_names]
            if "format" in entry
            else [""]
        )
        for field in fields:
            out[new + field] = tensors[name + field]
    save_file(
        out,
        file,
        metadata=meta | {TREE_KEY: json.dumps(new_leaves), "jaxrs.version": version or meta["jaxrs.version"]},
    )
    return meta


def test_version_1_folders_still_load(saved_q4k, tmp_path):
    """Folders written before the module tree (flat keys: `layers.q_proj`, `layers.q_proj_bias`, `embed`)
    load into the same tree, bit for bit."""
    from jaxrs.loading.param_file import _V1_MODULES

    back = {module: key for key, module in _V1_MODULES.items() if not key.startswith("experts_")}

    def to_v1(path: list[str]) -> list[str]:
        *prefix, leaf = path
        suffix = "_bias" if leaf == "bias" else ""
        if tuple(prefix[-2:]) in back:
            return [*prefix[:-2], back[tuple(prefix[-2:])] + suffix]
        return [*prefix[:-1], prefix[-1] + suffix]

    folder = broken_copy(saved_q4k[1], tmp_path)
    file = folder / "model.safetensors"
    assert rewrite_tree(file, to_v1, version="1")["jaxrs.version"] == "2"
    with safe_open(file, framework="np") as f:
        assert {"layers.q_proj.sc", "layers.input_norm", "embed.qs"} <= set(f.keys())
    assert_same_params(load_model(str(folder), device_layout=False).params, saved_q4k[0].params)


def test_missing_parameter_names_it(saved_q4k, tmp_path):
    folder = broken_copy(saved_q4k[1], tmp_path)
    rewrite_tree(
        folder / "model.safetensors", lambda p: None if p[-2:] == ["post_attn_norm", "weight"] else p
    )
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: parameter layers\.post_attn_norm\.weight is missing"
    ):
        load_model(str(folder))
