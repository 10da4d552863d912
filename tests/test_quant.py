"""Packed weight formats against gguf's reference (de)quantizers, and the QuantizedTensor pytree.

RMSE figures: `pytest -s tests/test_quant.py -k rmse` prints them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from jaxrs.errors import JaxrsError
from jaxrs.quant import (
    FORMATS,
    QUANTIZED_FORMATS,
    IsqChoice,
    QuantizedTensor,
    dequantize,
    from_gguf_bytes,
    isq_choice,
    isq_format,
    parse_format,
    quantize,
    stack,
    to_gguf_bytes,
)
from jaxrs.quant.hqq import rtn_params
from jaxrs.quant.policy import FALLBACK

GGUF_FORMATS = [name for name, s in FORMATS.items() if s.ggml_type is not None]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]
SHAPES = [(40, 512), (3, 16, 768)]  # a plain matrix and a stack of 3 layers


def weights(shape, seed=0) -> np.ndarray:
    """LLM-like rows: Gaussian with a per-row spread, a few outliers, one all-zero 256-run."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w *= np.exp(rng.normal(-4, 0.5, (*shape[:-1], 1))).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, 8, replace=False)] *= 20
    w.reshape(-1, shape[-1])[0, :256] = 0
    return w


def reference_dequantize(raw: np.ndarray, fmt: str, shape) -> np.ndarray:
    """gguf's dequantizer; Q8_K (which gguf lacks) decoded from ggml's block_q8_K by hand."""
    if fmt != "Q8_K":
        return gguf_quants.dequantize(raw, FORMATS[fmt].ggml_type).reshape(shape)
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view("<f4")
    qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
    bsums = blocks[:, 260:].copy().view("<i2")
    np.testing.assert_array_equal(bsums, qs.reshape(-1, 16, 16).sum(-1))
    return (d * qs).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "stacked"])
@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_dequantize_equals_gguf_and_roundtrips(fmt, shape):
    w = weights(shape)
    qt = quantize(w, fmt)
    assert qt.shape == shape and qt.fmt == fmt
    raw = to_gguf_bytes(qt)
    ref = reference_dequantize(raw, fmt, shape)
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qt)), ref)  # fused: still exact

    back = from_gguf_bytes(raw, FORMATS[fmt].ggml_type, shape)
    assert back.fmt == fmt and back.shape == shape
    for name in FORMATS[fmt].field_names:
        np.testing.assert_array_equal(back.arrays[name], qt.arrays[name])
    np.testing.assert_array_equal(to_gguf_bytes(back), raw)


# offsets of the float fields in each GGUF block (ggml's block_* structs): bytes there are set to
# finite values; every other byte is random
_FLOAT_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


@pytest.mark.parametrize("fmt", [f for f in GGUF_FORMATS if f in _FLOAT_FIELDS or f == "Q8_K"])
def test_random_gguf_bytes(fmt):
    """Any bit pattern a file may hold (not just what our quantizer makes) survives the repack."""
    rng = np.random.default_rng(1)
    shape = (6, 512)
    block, type_size = GGML_QUANT_SIZES[FORMATS[fmt].ggml_type]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, type_size), dtype=np.uint8)
    if fmt == "Q8_K":
        blocks[:, :4] = rng.normal(0, 0.01, (len(blocks), 1)).astype("<f4").view(np.uint8)
        qs = blocks[:, 4:260].view(np.int8).astype(np.int16).reshape(-1, 16, 16)
        blocks[:, 260:] = qs.sum(-1).astype("<i2").view(np.uint8)
    else:
        for off in _FLOAT_FIELDS[fmt]:
            blocks[:, off : off + 2] = rng.normal(0, 0.01, (len(blocks), 1)).astype("<f2").view(np.uint8)
    raw = blocks.reshape(shape[0], -1)
    qt = from_gguf_bytes(raw, FORMATS[fmt].ggml_type, shape)
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), reference_dequantize(raw, fmt, shape))
    np.testing.assert_array_equal(to_gguf_bytes(qt), raw)


@pytest.mark.parametrize("fmt", LEGACY + ["F16", "BF16"])
def test_legacy_bytes_equal_gguf(fmt):
    w = weights((3, 24, 512), seed=2)
    w[0, 1] = 0.25  # a constant row
    w[0, 2, :32] = np.linspace(-1, 1, 32)  # exact ties
    ours = to_gguf_bytes(quantize(w, fmt))
    theirs = gguf_quants.quantize(w, FORMATS[fmt].ggml_type).view(np.uint8).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_kquant_rmse_against_gguf_legacy():
    """Our K-quant bytes, dequantized by gguf, against gguf's own legacy formats of similar size."""
    w = weights((64, 2048), seed=3)
    err, bpw = {}, {}
    for fmt in KQUANTS:
        qt = quantize(w, fmt)
        err[fmt] = _rmse(reference_dequantize(to_gguf_bytes(qt), fmt, w.shape), w)
        bpw[fmt] = 8 * to_gguf_bytes(qt).size / w.size
    for fmt in LEGACY:
        qtype = FORMATS[fmt].ggml_type
        err[fmt + " (gguf)"] = _rmse(gguf_quants.dequantize(gguf_quants.quantize(w, qtype), qtype), w)
        bpw[fmt + " (gguf)"] = 8 * gguf_quants.quantize(w, qtype).size / w.size
    scale = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    print("\nformat        bits/weight  RMSE       RMSE / RMS(w)")
    for name in sorted(err, key=err.get):
        print(f"{name:12s}  {bpw[name]:11.4f}  {err[name]:.4e}  {err[name] / scale:.5f}")
    assert err["Q4_K"] <= err["Q4_0 (gguf)"]
    assert err["Q5_K"] <= err["Q5_0 (gguf)"]
    assert err["Q6_K"] <= err["Q5_1 (gguf)"]
    assert err["Q8_K"] <= err["Q6_K"] <= err["Q5_K"] <= err["Q4_K"] <= err["Q3_K"] <= err["Q2_K"]
    assert err["Q2_K"] < 0.5 * scale


def test_kquant_all_zero_superblocks():
    w = np.zeros((2, 512), np.float32)
    for fmt in KQUANTS:
        assert not np.any(np.asarray(dequantize(quantize(w, fmt)))), fmt


@pytest.mark.parametrize("fmt", ["HQQ4", "HQQ8"])
def test_hqq_beats_round_to_nearest(fmt):
    bits = 4 if fmt == "HQQ4" else 8
    rng = np.random.default_rng(4)
    for w in (weights((64, 1024), seed=5), (rng.standard_t(3, (64, 1024)) * 0.02).astype(np.float32)):
        qt = quantize(w, fmt)
        assert qt.arrays["scale"].shape == (64, 1024 // 64)
        g = w.reshape(-1, 64)
        scale, zero = (a.astype(np.float32)[:, None] for a in rtn_params(g, 2**bits - 1))
        q = np.clip(np.rint(g / np.where(scale == 0, 1, scale) + zero), 0, 2**bits - 1)
        rtn = _rmse(((q - zero) * scale).reshape(w.shape), w)
        ours = _rmse(dequantize(qt), w)
        print(f"\n{fmt}: HQQ RMSE {ours:.4e}, round-to-nearest {rtn:.4e} ({ours / rtn:.3f}x)")
        assert ours < rtn


def test_hqq_has_no_gguf_encoding():
    with pytest.raises(JaxrsError, match="no GGUF encoding"):
        to_gguf_bytes(quantize(weights((4, 64)), "HQQ4"))


def test_parse_format():
    assert parse_format("Q4K") == parse_format("q4k") == parse_format("Q4_K") == "Q4_K"
    assert parse_format("4") == "Q4_K" and parse_format("8") == "Q8_0"
    assert parse_format("q8_0") == parse_format("Q80") == "Q8_0"
    assert parse_format("hqq4") == "HQQ4" and parse_format("bf16") == "BF16"
    assert parse_format("Q2K") == "Q2_K" and parse_format("Q8K") == "Q8_K"
    with pytest.raises(JaxrsError) as info:
        parse_format("Q7_K")
    assert "Q7_K" in str(info.value) and "Q4_K" in str(info.value) and "HQQ8" in str(info.value)


def test_bad_inputs_are_jaxrs_errors():
    with pytest.raises(JaxrsError, match="multiple of 256"):
        quantize(np.zeros((4, 96), np.float32), "Q4_K")
    with pytest.raises(JaxrsError, match="needs 180 bytes"):
        from_gguf_bytes(np.zeros(10, np.uint8), T.Q4_0, (10, 32))
    with pytest.raises(JaxrsError, match="IQ2_XXS"):
        from_gguf_bytes(np.zeros(66, np.uint8), T.IQ2_XXS, (1, 256))


# The format ISQ gives a matrix of row length 512 (a multiple of every block), 576 (of 64 and 32: the
# demo model's hidden size), 96 (of 32 only) and 40 (of none): llama.cpp's fallback table (Q4_K -> Q5_0,
# Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> a 4-bit 32-block format), HQQ's 64-groups -> the 32-block
# format of the same bits, float (None) when no 32-block fits.
ISQ_TABLE = {
    "Q4_0": ("Q4_0", "Q4_0", "Q4_0", None),
    "Q4_1": ("Q4_1", "Q4_1", "Q4_1", None),
    "Q5_0": ("Q5_0", "Q5_0", "Q5_0", None),
    "Q5_1": ("Q5_1", "Q5_1", "Q5_1", None),
    "Q8_0": ("Q8_0", "Q8_0", "Q8_0", None),
    "U8M": ("U8M", "U8M", "U8M", None),
    "Q8F": ("Q8F", "Q8F", "Q8F", None),
    "Q2_K": ("Q2_K", "Q4_0", "Q4_0", None),
    "Q3_K": ("Q3_K", "Q4_0", "Q4_0", None),
    "Q4_K": ("Q4_K", "Q5_0", "Q5_0", None),
    "Q5_K": ("Q5_K", "Q5_1", "Q5_1", None),
    "Q6_K": ("Q6_K", "Q8_0", "Q8_0", None),
    "Q8_K": ("Q8_K", "Q8_0", "Q8_0", None),
    "HQQ4": ("HQQ4", "HQQ4", "Q4_0", None),
    "HQQ8": ("HQQ8", "HQQ8", "Q8_0", None),
    "F16": ("F16", "F16", "F16", "F16"),
}


@pytest.mark.parametrize("fmt", list(ISQ_TABLE))
def test_isq_format_falls_back_per_tensor(fmt):
    name = "model.layers.0.self_attn.o_proj.weight"
    got = tuple(isq_format(name, (64, n), fmt) for n in (512, 576, 96, 40))
    assert got == ISQ_TABLE[fmt]
    assert isq_choice(name, (64, 512), fmt).reason == ""
    if got[1] != fmt:
        assert isq_choice(name, (64, 576), fmt).reason == f"row length not a multiple of {FORMATS[fmt].block}"
    if got[3] is None:
        assert isq_choice(name, (64, 40), fmt).reason == "row length not a multiple of 32"


def test_every_wide_block_falls_back_to_a_32_block_of_about_its_bits():
    assert set(ISQ_TABLE) >= set(QUANTIZED_FORMATS)
    for fmt in QUANTIZED_FORMATS:
        if FORMATS[fmt].block > 32:
            fallback = FORMATS[FALLBACK[fmt]]
            assert fallback.block == 32
            # never fewer bits (Q2_K, Q3_K: 4.5, as llama.cpp's IQ4_NL), at most two more (Q6_K: 8.5)
            assert 0 <= fallback.bits_per_weight() - FORMATS[fmt].bits_per_weight() <= 2
    assert FALLBACK["Q4_K"] == "Q5_0" and FALLBACK["Q6_K"] == "Q8_0"


def test_isq_leaves_norms_biases_and_routers_float():
    assert isq_format("model.layers.0.self_attn.q_proj.weight", (576, 576), "Q8_0") == "Q8_0"
    assert isq_format("model.layers.0.mlp.gate_proj.weight", (1536, 576), "Q4_0") == "Q4_0"
    assert isq_format("model.layers.experts.w1", (8, 1024, 512), "Q4_K") == "Q4_K"  # stacked experts
    for name, shape in [
        ("model.layers.0.input_layernorm.weight", (576,)),
        ("model.norm.weight", (1, 576)),
        ("model.layers.0.self_attn.q_proj.bias", (576,)),
    ]:
        assert isq_choice(name, shape, "Q4_0") == IsqChoice(None, "norms, biases")
    router = isq_choice("model.layers.0.block_sparse_moe.gate.weight", (8, 4096), "Q4_K")
    assert router == IsqChoice(None, "routers")


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight", "output.weight"])
def test_isq_packs_embedding_and_head_compactly(name):
    assert isq_format(name, (49152, 576), "Q4_K") == "Q8_0"  # the default: Q8_0 whatever the format
    assert isq_format(name, (49152, 576), "Q2_K") == "Q8_0"
    assert isq_format(name, (49152, 576), "Q4_K", embeddings="float") is None
    # asked for the ISQ format: the matrix rule's, when smaller than Q8_0
    assert isq_format(name, (49152, 576), "Q4_K", embeddings="isq") == "Q5_0"
    assert isq_format(name, (49152, 512), "Q4_K", embeddings="isq") == "Q4_K"
    assert isq_format(name, (49152, 576), "Q6_K", embeddings="isq") == "Q8_0"
    assert isq_format(name, (49152, 576), "HQQ8", embeddings="isq") == "Q8_0"
    assert isq_format(name, (49152, 40), "Q4_K") is None  # no 32-block fits
    assert isq_format(name, (49152, 40), "F16") == "F16"  # a float ISQ format: never fewer bits
    assert isq_choice(name, (49152, 576), "Q8_0").reason == "embedding, head"
    assert isq_format("blk.0.attn_output.weight", (576, 576), "Q4_K") == "Q5_0"  # not GGUF's head
    with pytest.raises(JaxrsError, match="q8_0, isq, float"):
        isq_format(name, (49152, 576), "Q4_K", embeddings="int8")


def test_pytree_jit_scan_and_stack():
    layers = [weights((16, 256), seed=i) for i in range(3)]
    parts = [quantize(w, "Q4_K") for w in layers]
    qt = jax.device_put(stack(parts))
    assert isinstance(qt, QuantizedTensor) and qt.shape == (3, 16, 256) and qt.lead_shape == (3,)
    assert qt.arrays["qs"].shape == (3, 16, 128) and qt.arrays["d"].shape == (3, 16, 1)
    leaves, treedef = jax.tree.flatten(qt)
    assert len(leaves) == 5 and jax.tree.unflatten(treedef, leaves).shape == qt.shape
    expected = np.stack([np.asarray(dequantize(p)) for p in parts])

    @jax.jit
    def run(x, qt):
        def body(carry, layer):  # the scan hands the body one [out, in] layer
            assert isinstance(layer, QuantizedTensor) and layer.shape == (16, 256)
            w = dequantize(layer)
            return carry + x @ w, w

        return jax.lax.scan(body, jnp.zeros((2, 256)), qt)

    total, per_layer = run(jnp.ones((2, 16)), qt)
    np.testing.assert_array_equal(np.asarray(per_layer), expected)
    np.testing.assert_allclose(np.asarray(total), np.ones((2, 16)) @ expected.sum(0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(dequantize(qt[1])), expected[1])
    assert qt[0:2].shape == (2, 16, 256)
    with pytest.raises(JaxrsError, match="cannot stack"):
        stack([parts[0], quantize(layers[1], "Q8_0")])


@pytest.mark.slow
def test_real_gguf_tensors(demo_gguf):
    """Tensors of the demo GGUF (Q4_1 and Q8_0) repack and dequantize exactly as gguf reads them."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(demo_gguf).tensors if len(t.shape) == 2]
    picked = [t for t in tensors if t.tensor_type == T.Q8_0][:1] + [
        t for t in tensors if t.tensor_type == T.Q4_1
    ][:4]
    assert len(picked) == 5
    for tensor in picked:
        shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        raw = np.asarray(tensor.data).reshape(shape[0], -1)[:1024]  # the first rows are plenty
        shape = (len(raw), shape[1])
        qt = from_gguf_bytes(raw, tensor.tensor_type, shape)
        ref = gguf_quants.dequantize(raw, tensor.tensor_type).reshape(shape)
        np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qt)), ref)
        np.testing.assert_array_equal(to_gguf_bytes(qt).reshape(-1), raw.reshape(-1))
