"""Quantized weights in the model: GGUF tensors kept packed, in-situ quantization while loading, GGUF
files re-quantized to another type, and what each format costs in perplexity and bytes."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from jaxrs.cli import main
from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.eval import perplexity
from jaxrs.llm import LLM
from jaxrs.loading import load_model
from jaxrs.loading.gguf_export import file_type_of, requantize_gguf
from jaxrs.loading.gguf_reader import open_gguf
from jaxrs.loading.isq import isq_summary, quantizing_getter
from jaxrs.quant import (
    FORMATS,
    QUANTIZED_FORMATS,
    QuantizedTensor,
    dequantize,
    isq_format,
    quantize,
    to_gguf_bytes,
)
from jaxrs.quant.tensor import tree_nbytes
from jaxrs.quant.transcode import CPU_LAYOUT
from tests.conftest import relative_error, save_tiny_hf_model, save_tiny_tokenizer, tiny_llama_config
from tests.gemma3_gguf import fetch_or_skip
from tests.paged import PagedRun
from tests.test_ggml_file import llama_cpp_permute

TINY = tiny_llama_config()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-isq")
    save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return folder


def logits(loaded, ids):
    return PagedRun(loaded.config, loaded.params, num_blocks=16).feed(ids)


def dequantized(params):
    """The same tree with every packed weight replaced by its float value."""
    return jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QuantizedTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


@pytest.fixture(scope="module")
def reference_logits(tiny):
    return logits(load_model(str(tiny)), IDS)


IDS = list(range(3, 40))
ERRORS = {}


@pytest.mark.parametrize("fmt", ["8", "Q4K", "hqq4"])
def test_isq_packs_matrices_and_matmuls_read_them_exactly(tiny, reference_logits, fmt):
    packed = load_model(str(tiny), isq=fmt)
    layers = packed.params["layers"]
    matrices = [layers["attn"][k]["weight"] for k in ("q_proj", "k_proj", "o_proj")]
    assert all(isinstance(w, QuantizedTensor) for w in [*matrices, layers["mlp"]["down_proj"]["weight"]])
    assert not isinstance(layers["input_norm"]["weight"], QuantizedTensor)  # norms stay float
    # the embedding and head are packed too, in Q8_0 whatever the format (they were float before); on
    # CPU in its layout, Q8F (`loading.device_layout`)
    held = "Q8F" if jax.default_backend() == "cpu" else "Q8_0"
    assert packed.params["embed"]["weight"].fmt == packed.params["lm_head"]["weight"].fmt == held
    ours = logits(packed, IDS)
    unpacked = PagedRun(packed.config, dequantized(packed.params), num_blocks=16).feed(IDS)
    np.testing.assert_allclose(ours, unpacked, rtol=0, atol=1e-5 * np.abs(unpacked).max())
    ERRORS[fmt] = relative_error(ours, reference_logits)
    print(f"ISQ {fmt}: max relative logit error against float weights {ERRORS[fmt]:.3g}")
    assert ERRORS[fmt] > 0


def test_more_bits_give_smaller_error():
    if len(ERRORS) < 3:
        pytest.skip("needs the ISQ runs above")
    assert ERRORS["8"] < ERRORS["Q4K"] and ERRORS["8"] < ERRORS["hqq4"]


def test_isq_logs_one_summary_line_and_can_keep_the_embeddings_float(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        load_model(str(tiny), isq="Q4K")
        kept = load_model(str(tiny), isq="Q4K", isq_embeddings="float")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ISQ ")]
    assert lines == [
        "ISQ Q4_K: 14 tensors Q4_K, 2 Q8_0 (embedding, head), 5 float (norms, biases)",
        "ISQ Q4_K: 14 tensors Q4_K, 5 float (norms, biases), 2 float (embedding, head)",
    ]
    assert not isinstance(kept.params["embed"]["weight"], QuantizedTensor)
    assert not isinstance(kept.params["lm_head"]["weight"], QuantizedTensor)


def test_unknown_isq_type_is_rejected_with_the_valid_names(tiny):
    with pytest.raises(JaxrsError, match="Q4_K") as info:
        load_model(str(tiny), isq="Q4_X")
    assert "Q4_X" in str(info.value)


@pytest.mark.slow
def test_packed_gguf_equals_dequantized_load(demo_gguf):
    plain = load_model(str(demo_gguf), packed=False)
    packed = load_model(str(demo_gguf))  # the default
    on_cpu = jax.default_backend() == "cpu"  # see the bytes test below
    assert packed.params["layers"]["attn"]["q_proj"]["weight"].fmt == (
        "U8M" if on_cpu else "Q4_1"
    ) and packed.params["embed"]["weight"].fmt == ("Q8F" if on_cpu else "Q8_0")
    ids = list(range(100, 124))
    # the same weights; on CPU the packed head's product runs in vocabulary slices (`head_slices`), whose
    # dots may sum in another order than one dense product: equal to float32 rounding
    np.testing.assert_allclose(logits(packed, ids), logits(plain, ids), rtol=1e-5, atol=2e-4)


# --- every format on the tiny model: ISQ load, greedy generation, perplexity ------------------------

TINY_TEXT = " ".join(f"w{3 + (37 * i) % 251}" for i in range(160))  # 160 tokens of the word vocabulary
# A random model predicts this text badly in any format (ppl about 640 over 256 tokens), and quantization
# noise moves it either way (measured 0.79x for Q2_K to 1.02x for Q4_1): a loose bound that catches a
# broken format, not a quality figure (those come from SmolLM2 below).
TINY_PPL_RATIO_BOUND = 1.25


@pytest.fixture(scope="module")
def tiny_float_ppl(tiny):
    return perplexity(LLM(str(tiny), kv_cache_mb=4, max_num_seqs=2), TINY_TEXT)


def test_perplexity_is_the_mean_likelihood_of_each_window(tiny):
    llm = LLM(str(tiny), kv_cache_mb=4, max_num_seqs=2, max_model_len=64)
    ids = llm.tokenizer.encode(TINY_TEXT)
    nll = []
    for start in range(0, len(ids), 64):  # 64 + 64 + 32 tokens: each window starts without context
        window = ids[start : start + 64]
        logits = PagedRun(llm.model.config, llm.model.params, num_blocks=16).feed(window)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        nll += [-logp[i, window[i + 1]] for i in range(len(window) - 1)]
    assert perplexity(llm, TINY_TEXT) == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)
    with pytest.raises(JaxrsError, match="at least 2 tokens"):
        perplexity(llm, "w3")


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_every_format_generates_and_keeps_perplexity(tiny, tiny_float_ppl, fmt):
    llm = LLM(str(tiny), isq=fmt, kv_cache_mb=4, max_num_seqs=2)
    held = CPU_LAYOUT.get(fmt, fmt) if jax.default_backend() == "cpu" else fmt  # `loading.device_layout`
    assert llm.model.params["layers"]["mlp"]["gate_proj"]["weight"].fmt == held
    out = llm.generate([[3, 4, 5, 6]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4
    ratio = perplexity(llm, TINY_TEXT) / tiny_float_ppl
    print(f"{fmt}: perplexity {ratio:.4f}x the float model's ({tiny_float_ppl:.1f})")
    assert ratio <= TINY_PPL_RATIO_BOUND


# --- GGUF files re-quantized to another type -----------------------------------------------------

GGUF_FORMATS = [f for f in QUANTIZED_FORMATS if FORMATS[f].ggml_type is not None and f != "Q8_K"]


def demo_file_type(name: str) -> QT:
    """The demo file's types: matrices Q4_1, embedding and head Q8_0."""
    return QT.Q8_0 if "embed" in name or "lm_head" in name else QT.Q4_1


def write_tiny_gguf(model, path: Path, matrix_type: Callable[[str], QT] = demo_file_type) -> None:
    """The tiny model as llama.cpp's converter writes a llama GGUF (q/k rows permuted), norms F32 and
    each matrix in `matrix_type(its HF name)`. No vocabulary."""
    hf = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf.num_hidden_layers)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    w.add_context_length(hf.max_position_embeddings)
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_rope_dimension_count(hf.hidden_size // hf.num_attention_heads)
    w.add_vocab_size(hf.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, hf.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, hf.num_key_value_heads)
        qtype = QT.F32 if data.ndim == 1 else matrix_type(name)
        if qtype in (QT.Q4_K, QT.Q6_K):  # gguf-py has no K-quant quantizers
            data = to_gguf_bytes(quantize(data, qtype.name))
        elif qtype != QT.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gguf")
    model = save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    write_tiny_gguf(model, folder / "tiny.gguf")
    return folder


def assert_same_weights(packed: dict, isq: dict) -> None:
    """Tensors packed alike in both trees hold the same arrays; every other tensor has the same values."""
    is_qt = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    ours = jax.tree_util.tree_leaves_with_path(packed, is_leaf=is_qt)
    theirs = jax.tree_util.tree_leaves_with_path(isq, is_leaf=is_qt)
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    for (key, a), (_, b) in zip(ours, theirs, strict=True):
        where = jax.tree_util.keystr(key)
        if is_qt(a) and is_qt(b) and a.fmt == b.fmt:  # (on CPU a packed load may be in U8M / Q8_0)
            assert a.shape == b.shape, where
            for name in a.arrays:
                np.testing.assert_array_equal(np.asarray(a.arrays[name]), np.asarray(b.arrays[name]), where)
        else:
            value = lambda x: np.asarray(dequantize(x) if is_qt(x) else x)  # noqa: E731
            np.testing.assert_array_equal(value(a), value(b), where)


def test_isq_rule_reads_gguf_names():
    assert isq_format("blk.0.attn_output.weight", (256, 576), "Q4_K") == "Q5_0"
    assert isq_format("output.weight", (256, 256), "Q4_K") == "Q8_0"
    assert isq_format("token_embd.weight", (256, 256), "Q4_K") == "Q8_0"
    assert isq_format("output.weight", (256, 256), "Q4_K", embeddings="isq") == "Q4_K"
    assert isq_format("output_norm.weight", (256,), "Q4_K") is None


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_requantized_gguf_loads_packed_as_the_isq_weights(tiny_gguf, tmp_path, fmt):
    src, dst = tiny_gguf / "tiny.gguf", tmp_path / f"tiny-{fmt}.gguf"
    done = requantize_gguf(src, dst, fmt)
    layers = TINY.num_hidden_layers
    # the matrices, embedding and head (Q8_0) re-quantized; the norms copied
    assert (done["requantized"], done["copied"]) == (7 * layers + 2, 2 * layers + 1)
    reader = open_gguf(dst)
    assert reader.metadata["general.file_type"] == file_type_of(fmt)
    assert {t.tensor_type.name for t in reader.tensors} == {fmt, "Q8_0", "F32"}
    packed = load_model(str(dst), packed=True, tokenizer=str(tiny_gguf))
    isq = load_model(str(src), isq=fmt, tokenizer=str(tiny_gguf))
    assert_same_weights(packed.params, isq.params)


def q4_k_m_like(name: str) -> QT:
    """Layer 0 gets more bits in attn_v and ffn_down, as llama.cpp's Q4_K_M mix does on some layers."""
    first = "layers.0." in name
    if name.endswith("v_proj.weight"):
        return QT.Q8_0 if first else QT.Q5_0
    if name.endswith("down_proj.weight"):
        return QT.Q6_K if first else QT.Q4_K
    return demo_file_type(name)


def test_layers_in_mixed_types_load_packed_in_the_richer_one(tmp_path):
    model = save_tiny_hf_model(TINY, tmp_path)
    save_tiny_tokenizer(tmp_path, TINY.vocab_size)
    write_tiny_gguf(model, tmp_path / "mixed.gguf", q4_k_m_like)
    packed = load_model(str(tmp_path / "mixed.gguf"), packed=True, tokenizer=str(tmp_path))
    floats = load_model(str(tmp_path / "mixed.gguf"), tokenizer=str(tmp_path), packed=False)
    layers, float_layers = packed.params["layers"], floats.params["layers"]
    # On CPU, Q4_K first moves exactly into U8M, which then holds the Q6_K layer re-quantized; Q5_0 and
    # Q8_0 both move exactly into Q8F.
    on_cpu = jax.default_backend() == "cpu"
    down_format, exact, moved = ("U8M", 1, 0) if on_cpu else ("Q6_K", 0, 1)
    assert (layers["attn"]["v_proj"]["weight"].fmt, layers["mlp"]["down_proj"]["weight"].fmt) == (
        "Q8F" if on_cpu else "Q8_0",
        down_format,
    )
    np.testing.assert_array_equal(
        np.asarray(dequantize(layers["attn"]["v_proj"]["weight"])), float_layers["attn"]["v_proj"]["weight"]
    )  # exact
    down, float_down = (
        np.asarray(dequantize(layers["mlp"]["down_proj"]["weight"])),
        np.asarray(float_layers["mlp"]["down_proj"]["weight"]),
    )
    np.testing.assert_array_equal(down[exact], float_down[exact])
    assert 0 < relative_error(down[moved], float_down[moved]) < 0.02
    ours = logits(packed, IDS)
    unpacked = PagedRun(packed.config, dequantized(packed.params), num_blocks=16).feed(IDS)
    np.testing.assert_allclose(ours, unpacked, rtol=0, atol=1e-5 * np.abs(unpacked).max())
    assert relative_error(ours, logits(floats, IDS)) < 0.02  # one matrix re-quantized: 0.011 on GPU's path


@pytest.mark.parametrize("fmt", ["HQQ4", "Q8_K", "F16"])
def test_formats_without_a_gguf_weight_type_are_refused(tiny_gguf, tmp_path, fmt):
    with pytest.raises(JaxrsError, match=fmt):
        requantize_gguf(tiny_gguf / "tiny.gguf", tmp_path / "x.gguf", fmt)
    assert not list(tmp_path.iterdir())


def test_cli_quantize_to_a_gguf_file(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "tiny-q4_0.gguf"
    argv = ["--log-level", "WARNING", "quantize", "--model", str(tiny_gguf / "tiny.gguf"), "--isq", "q4_0"]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert (types["blk.0.attn_output.weight"], types["token_embd.weight"]) == ("Q4_0", "Q8_0")
    loaded = load_model(str(out), packed=True, tokenizer=str(tiny_gguf))
    assert loaded.params["layers"]["attn"]["o_proj"]["weight"].fmt in ("Q4_0", "Q8F")  # Q8F: on CPU

    assert main(["quantize", "--model", str(tiny_gguf), "--isq", "8", "--out", str(out)]) == 1  # HF folder
    assert "needs a GGUF model" in capsys.readouterr().err
    assert main([*argv[:-1], "hqq4", "--out", str(out)]) == 1
    assert "no GGUF encoding" in capsys.readouterr().err


def test_cli_isq_embeddings_flag(tiny, tiny_gguf, tmp_path, capsys, caplog):
    """`--isq-embeddings` reaches every ISQ path: `quantize` to a folder or a GGUF, and `run` (whose
    loading `serve` shares)."""
    quiet = ["--log-level", "WARNING"]
    folder = tmp_path / "float-embeddings"
    argv = [*quiet, "quantize", "--model", str(tiny), "--isq", "Q4K", "--isq-embeddings", "float"]
    assert main([*argv, "--out", str(folder)]) == 0
    params = load_model(str(folder), device_layout=False).params  # the formats the folder holds
    assert not isinstance(params["embed"]["weight"], QuantizedTensor)
    assert params["layers"]["attn"]["q_proj"]["weight"].fmt == "Q4_K"
    out = tmp_path / "isq-embeddings.gguf"
    argv = [*quiet, "quantize", "--model", str(tiny_gguf / "tiny.gguf"), "--isq", "q4_0"]
    assert main([*argv, "--isq-embeddings", "isq", "--out", str(out)]) == 0
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "Q4_0"  # not Q8_0
    run = ["run", "--model", str(tiny), "--isq", "Q4K", "--prompt", "w3 w4", "--raw", "--max-tokens", "2"]
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        assert main([*run, "--kv-cache-mb", "4", "--isq-embeddings", "FLOAT"]) == 0
    assert "ISQ Q4_K: 14 tensors Q4_K, 5 float (norms, biases), 2 float (embedding, head)" in caplog.messages
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["serve", "--isq-embeddings", "q4"])
    assert "ISQ embeddings must be one of q8_0, isq, float, got 'q4'" in capsys.readouterr().err


# --- the demo model (SmolLM2-135M): perplexity per format, device bytes ---------------------------

ENGLISH = Path(__file__).parent / "data" / "english.txt"
# Bounds on ppl(ISQ) / ppl(float) for SmolLM2-135M-Instruct on tests/data/english.txt, float = the Q4_1
# GGUF dequantized, so every type re-quantizes Q4_1 values (Q4_1 itself gives them back exactly; a finer
# grid that does not contain Q4_1's levels still rounds them). K-quants pack ffn_down (1536 wide) and
# put the 576-wide matrices in their 32-block fallback (Q4_K: Q5_0, Q6_K: Q8_0...), so their ratios are
# mostly the fallback's. Measured with bench/bench_isq.py (bench/RESULTS.md, "Quantized formats on the
# demo model"; the K-quant rows with the fallback, by `jaxrs.eval.perplexity` on ISQ loads); each bound
# is the measured ratio plus 30% of its excess over 1, and at least 1.001.
SMOLLM2_PPL_BOUNDS = {
    "Q4_0": 1.293,
    "Q4_1": 1.001,
    "Q5_0": 1.143,
    "Q5_1": 1.189,
    "Q8_0": 1.004,
    "Q2_K": 8.222,
    "Q3_K": 1.554,
    "Q4_K": 1.116,
    "Q5_K": 1.163,
    "Q6_K": 1.002,
    "Q8_K": 1.008,
    "HQQ4": 1.431,
    "HQQ8": 1.001,
}
SMOLLM2_TESTED = ("Q8_0", "Q5_1", "Q4_0", "Q8_K", "Q6_K")  # quick to quantize; bench_isq.py runs them all


@pytest.fixture(scope="module")
def smollm2_float_ppl(demo_gguf):
    # the file's values in float and an exact cache: the reference the bounds below were measured against
    exact = LLM(str(demo_gguf), packed=False, kv_cache_dtype="float32", kv_cache_mb=64, max_num_seqs=1)
    return perplexity(exact, ENGLISH.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", SMOLLM2_TESTED)
def test_smollm2_perplexity_per_format(demo_gguf, smollm2_float_ppl, fmt):
    llm = LLM(str(demo_gguf), isq=fmt, kv_cache_dtype="float32", kv_cache_mb=64, max_num_seqs=1)
    ppl = perplexity(llm, ENGLISH.read_text())
    print(f"SmolLM2 {fmt}: perplexity {ppl:.3f}, float {smollm2_float_ppl:.3f}")
    assert ppl / smollm2_float_ppl <= SMOLLM2_PPL_BOUNDS[fmt]
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].token_ids) == 8


@pytest.mark.slow
def test_packed_demo_weights_are_the_file_values_in_few_bytes(demo_gguf):
    """On GPU the packed tree takes the file's tensor bytes; on CPU the Q4_1 matrices move exactly into
    U8M (one byte a weight, `quant.transcode`) and the Q8_0 embedding into Q8F (its scales in f32),
    still a third of f32's bytes."""
    packed = load_model(str(demo_gguf))  # the default
    device = tree_nbytes(packed.params)
    in_file = sum(int(t.n_bytes) for t in open_gguf(demo_gguf).tensors)
    print(f"demo model packed: {device / 2**20:.2f} MiB on device, file tensors {in_file / 2**20:.2f} MiB")
    is_qt = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    formats = {leaf.fmt for leaf in jax.tree.leaves(packed.params, is_leaf=is_qt) if is_qt(leaf)}
    floats = load_model(str(demo_gguf), packed=False).params
    if jax.default_backend() == "cpu":
        assert formats == {"Q8F", "U8M"}
        assert tree_nbytes(floats) > 3 * device
    else:
        assert formats == {"Q8_0", "Q4_1"}
        assert abs(device - in_file) <= 0.02 * in_file
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, dequantized(packed.params)), floats)


# --- the demo model under ISQ: every matrix packed, in the bytes its formats promise ----------------

# Per format: the summary line (SmolLM2-135M: 30 layers; q/k/v/o/gate/up are 576 wide, down 1536; tied
# embeddings, so one embedding tensor and no head), then a bound on the max relative logit error against
# the float model (the Q4_1 file dequantized, so 4-bit grids re-round its 16 levels: the perplexity
# bounds below tell more). Measured: Q4_K 0.131 (95.7 MiB), Q8_0 0.026 (136.4), Q4_0 0.372 (85.8), Q6_K
# 0.070 (130.3), HQQ4 0.270 (85.8); each bound is the measure plus 30%.
DEMO_ISQ = {
    "Q4_K": "ISQ Q4_K: 30 tensors Q4_K, 180 Q5_0 (row length not a multiple of 256), 1 Q8_0 (embedding, "
    "head), 61 float (norms, biases)",
    "Q8_0": "ISQ Q8_0: 210 tensors Q8_0, 1 Q8_0 (embedding, head), 61 float (norms, biases)",
    "Q4_0": "ISQ Q4_0: 210 tensors Q4_0, 1 Q8_0 (embedding, head), 61 float (norms, biases)",
    "Q6_K": "ISQ Q6_K: 30 tensors Q6_K, 180 Q8_0 (row length not a multiple of 256), 1 Q8_0 (embedding, "
    "head), 61 float (norms, biases)",
    "HQQ4": "ISQ HQQ4: 210 tensors HQQ4, 1 Q8_0 (embedding, head), 61 float (norms, biases)",
}
DEMO_LOGIT_ERROR = {"Q4_K": 0.17, "Q8_0": 0.034, "Q4_0": 0.48, "Q6_K": 0.091, "HQQ4": 0.35}
DEMO_IDS = list(range(100, 124))


def promised_bytes(params: dict) -> int:
    """What the formats the tensors took promise: elements x bits per weight / 8 (GGUF's for a GGUF
    type, our layout's for HQQ), float tensors at their own size."""
    is_qt = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    total = 0.0
    for leaf in jax.tree.leaves(params, is_leaf=is_qt):
        if not is_qt(leaf):
            total += leaf.nbytes
            continue
        spec = FORMATS[leaf.fmt]
        if spec.ggml_type is None:
            bits = spec.bits_per_weight()
        else:
            block, size = gguf.GGML_QUANT_SIZES[spec.ggml_type]
            bits = 8 * size / block
        total += np.prod(leaf.shape) * bits / 8
    return int(total)


@pytest.fixture(scope="module")
def demo_float_logits(demo_gguf):
    return logits(load_model(str(demo_gguf), packed=False), DEMO_IDS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(DEMO_ISQ))
def test_demo_isq_packs_every_matrix_in_the_bytes_promised(demo_gguf, demo_float_logits, fmt, caplog):
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        loaded = load_model(str(demo_gguf), isq=fmt)
    assert DEMO_ISQ[fmt] in [r.getMessage() for r in caplog.records]
    is_qt = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(loaded.params, is_leaf=is_qt)
    floats = [jax.tree_util.keystr(k) for k, x in leaves if not is_qt(x)]
    assert floats and all("norm" in path for path in floats)  # every matrix is packed
    device, promised = tree_nbytes(loaded.params), promised_bytes(loaded.params)
    print(f"demo ISQ {fmt}: {device / 2**20:.1f} MiB on device, the formats promise {promised / 2**20:.1f}")
    assert abs(device - promised) <= 0.1 * promised
    error = relative_error(logits(loaded, DEMO_IDS), demo_float_logits)
    print(f"demo ISQ {fmt}: max relative logit error against the float model {error:.3g}")
    assert error < DEMO_LOGIT_ERROR[fmt]


# --- real models' shapes under ISQ: Gemma-3-270M and Qwen2.5-Coder-0.5B -----------------------------

# A full ISQ load per format costs minutes of CPU on these models (K-quants and HQQ4 quantize about
# 2 M weights a second on one core; Qwen2.5-0.5B has 630 M), so the bytes are checked on a subset with
# their real shapes: the first layer whole, and the first rows of the embedding and head (at their real
# row length: Q8_0's bytes per row do not depend on the row count). Rows of 640 (Gemma) and 896 (Qwen)
# do not divide by 256, so K-quants take their 32-block fallback there; Gemma's attn_output (rows of
# 1024) and both models' ffn_down take the K-quant itself.
REAL_EMBEDDING_ROWS = 4096
REAL_ISQ = {
    "gemma-3-270m": {
        "Q4_K": "ISQ Q4_K: 2 tensors Q4_K, 1 Q8_0 (embedding, head), 5 Q5_0 (row length not a multiple of "
        "256), 6 float (norms, biases)",
        "Q8_0": "ISQ Q8_0: 7 tensors Q8_0, 1 Q8_0 (embedding, head), 6 float (norms, biases)",
        "Q4_0": "ISQ Q4_0: 7 tensors Q4_0, 1 Q8_0 (embedding, head), 6 float (norms, biases)",
        "Q6_K": "ISQ Q6_K: 2 tensors Q6_K, 1 Q8_0 (embedding, head), 5 Q8_0 (row length not a multiple of "
        "256), 6 float (norms, biases)",
        "HQQ4": "ISQ HQQ4: 7 tensors HQQ4, 1 Q8_0 (embedding, head), 6 float (norms, biases)",
    },
    "Qwen2.5-Coder-0.5B-Instruct": {
        "Q4_K": "ISQ Q4_K: 1 tensors Q4_K, 2 Q8_0 (embedding, head), 6 Q5_0 (row length not a multiple of "
        "256), 5 float (norms, biases)",
        "Q8_0": "ISQ Q8_0: 7 tensors Q8_0, 2 Q8_0 (embedding, head), 5 float (norms, biases)",
        "Q4_0": "ISQ Q4_0: 7 tensors Q4_0, 2 Q8_0 (embedding, head), 5 float (norms, biases)",
        "Q6_K": "ISQ Q6_K: 1 tensors Q6_K, 2 Q8_0 (embedding, head), 6 Q8_0 (row length not a multiple of "
        "256), 5 float (norms, biases)",
        "HQQ4": "ISQ HQQ4: 7 tensors HQQ4, 2 Q8_0 (embedding, head), 5 float (norms, biases)",
    },
}
assert all(set(rows) == set(DEMO_ISQ) for rows in REAL_ISQ.values())


@pytest.fixture(scope="module", params=list(REAL_ISQ))
def real_tensors(request) -> tuple[str, dict[str, np.ndarray]]:
    """(model name, its GGUF-named tensors dequantized to f32): the first layer, and the first
    `REAL_EMBEDDING_ROWS` rows of the embedding and head."""
    reader = open_gguf(fetch_or_skip(request.param))
    tensors = {}
    for t in reader.tensors:
        if t.name.startswith("blk.0."):
            tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type)
        elif t.name in ("token_embd.weight", "output.weight"):
            tensors[t.name] = gguf.quants.dequantize(t.data[:REAL_EMBEDDING_ROWS], t.tensor_type)
    return request.param, tensors


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(DEMO_ISQ))
def test_real_model_tensors_take_the_bytes_promised(real_tensors, fmt):
    """The loader's ISQ getter on real shapes: the summary line (every matrix packed, the fallbacks where
    rows do not divide) and the bytes within 10% of what the formats promise."""
    name, tensors = real_tensors
    tally: Counter = Counter()
    get = quantizing_getter(tensors.__getitem__, fmt, tally=tally)
    packed = {n: get(n) for n in tensors}
    assert isq_summary(fmt, tally) == REAL_ISQ[name][fmt]
    device, promised = tree_nbytes(packed), promised_bytes(packed)
    print(f"{name} ISQ {fmt}: {device / 2**20:.2f} MiB, the formats promise {promised / 2**20:.2f}")
    assert abs(device - promised) <= 0.1 * promised
