"""Quantized matmul: the Pallas kernels against the XLA reference, which is checked against a plain dot
with the dequantized weight. The kernels are interpreted on CPU and compiled with Triton on a GPU.

Interpret mode fills a kernel's outputs with NaN before running it, so "no NaN" also checks that
every output element was written. Shapes are small: interpret mode is slow.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrs import ops
from jaxrs.ops import qmatmul_pallas, qmatmul_xla
from jaxrs.quant import FORMATS, QuantizedTensor, dequantize, quantize
from pallas_kernels import qmatmul
from pallas_kernels.qmatmul import plane_permutation

OUT = 40  # not a multiple of BLOCK_N
BLOCK_N = 32
# `in` per family, with the step size (elements) that leaves a partial last step
IN_AND_STEP = {"float": (544, 256), "legacy": (544, 256), "k": (768, 512), "hqq": (576, 256)}


@functools.cache
def packed(fmt: str):
    in_features, _ = IN_AND_STEP[FORMATS[fmt].family]
    rng = np.random.default_rng(sum(map(ord, fmt)))
    return jax.device_put(quantize(rng.standard_normal((OUT, in_features)).astype(np.float32), fmt))


def inputs(fmt: str, rows: int, dtype=jnp.float32) -> jax.Array:
    rng = np.random.default_rng(rows)
    return jnp.asarray(rng.standard_normal((rows, packed(fmt).out_in[1])), dtype)


def close(ours: jax.Array, ref: jax.Array, tol: float) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape and not np.isnan(ours).any()
    assert np.max(np.abs(ours - ref)) <= tol * np.max(np.abs(ref))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_xla_reference_is_a_dot_with_the_dequantized_weight(fmt):
    qt, x = packed(fmt), inputs(fmt, 3)
    close(qmatmul_xla(x, qt), x @ dequantize(qt).T, 1e-5)
    y = qmatmul_xla(x.astype(jnp.bfloat16), qt)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, OUT)


@pytest.mark.parametrize("rows", [1, 33], ids=["decode", "prefill"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pallas_equals_xla(fmt, rows):
    qt, x = packed(fmt), inputs(fmt, rows)
    _, step = IN_AND_STEP[qt.spec.family]
    ours = qmatmul_pallas(x, qt, block_n=BLOCK_N, block_k=step)
    close(ours, qmatmul_xla(x, qt), 1e-5)


@pytest.mark.parametrize("split_k", [2, 3, 40])
@pytest.mark.parametrize("fmt", ["Q4_0", "Q6_K"])
def test_pallas_split_k(fmt, split_k):
    """Steps shared over programs, unevenly (3) and asked for more splits than steps (40)."""
    qt, x = packed(fmt), inputs(fmt, 2)
    close(qmatmul_pallas(x, qt, block_n=BLOCK_N, block_k=64, split_k=split_k), qmatmul_xla(x, qt), 1e-5)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_K", "HQQ4"])
def test_pallas_bf16_batched_decode(fmt):
    """bf16 activations with leading batch axes: 4 decode rows as [2, 2, in]."""
    qt = packed(fmt)
    x = inputs(fmt, 4, jnp.bfloat16).reshape(2, 2, -1)
    ours = qmatmul_pallas(x, qt, block_n=BLOCK_N)
    assert ours.shape == (2, 2, OUT) and ours.dtype == jnp.bfloat16
    close(ours, qmatmul_xla(x, qt), 2e-2)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_plane_permutation_covers_every_element(fmt):
    in_features, _ = IN_AND_STEP[FORMATS[fmt].family]
    perm = plane_permutation(fmt, in_features)
    assert sorted(perm.reshape(-1)) == list(range(in_features))


@pytest.mark.parametrize("fmt", ["Q4_1", "Q3_K", "Q6_K", "HQQ8"])
def test_pallas_lowers_to_triton(fmt):
    """The kernel's ops all have Triton lowerings (jaxpr -> Triton IR; compiling needs a GPU)."""
    qt, x = packed(fmt), inputs(fmt, 3, jnp.bfloat16)
    fn = jax.jit(functools.partial(qmatmul_pallas, interpret=False))
    text = fn.trace(x, qt).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "BF16"])
@pytest.mark.parametrize("rows", [1, 512], ids=["decode", "prefill"])
def test_pallas_lowers_at_8b_shapes(fmt, rows):
    """Llama-3-8B's MLP shapes (abstract arrays: nothing is allocated), where the default tiles meet
    the real `in`/`out` sizes; a decode row's small grid is split over `in`, a prefill's is not."""
    spec = FORMATS[fmt]
    fn = jax.jit(functools.partial(qmatmul_pallas, interpret=False))
    for out_in in [(14336, 4096), (4096, 14336)]:
        arrays = {
            f.name: jax.ShapeDtypeStruct((out_in[0], out_in[1] // f.per), jnp.dtype(f.dtype))
            for f in spec.fields
        }
        x = jax.ShapeDtypeStruct((rows, out_in[1]), jnp.bfloat16)
        lowered = fn.trace(x, QuantizedTensor(fmt, out_in, arrays)).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        assert "triton" in text.lower()
        (splits,) = set(re.findall(r"qmatmul_\w+_s(\d+)", text))
        assert (int(splits) > 1) == (rows == 1)


def test_registered_as_an_op():
    assert {"xla", "xla_bf16", "pallas"} <= set(ops.implementations("qmatmul"))
    assert ops.default_name("qmatmul", "cpu") == "xla"
    assert ops.default_name("qmatmul", "gpu") == "pallas"
    assert ops.Kernels.from_mapping({"qmatmul": "pallas"}).get("qmatmul") is qmatmul_pallas


def test_rejects_stacked_or_mismatched_weights():
    qt = packed("Q8_0")
    with pytest.raises(ValueError, match="features"):
        qmatmul_xla(jnp.ones((1, 32)), qt)
    stacked = jax.tree.map(lambda a: a[None], qt)
    with pytest.raises(ValueError, match="stacked"):
        qmatmul_pallas(jnp.ones((1, qt.out_in[1])), stacked)


@pytest.mark.parametrize("fmt", ["F32", "U8M", "Q8F", "Q6_K"])
def test_one_long_row_is_split_so_xla_cpu_fuses_the_weight_into_each_piece(fmt):
    """A row of 4,864 f32 inputs (Qwen2.5-0.5B's down_proj) is past XLA:CPU's 16 KiB limit for fusing a
    weight's producer into a one-row product: unsplit, the compiled step writes the whole weight out
    in f32 first. Split, every product is a fusion reading the packed arrays, and the result is the
    dot with the dequantized weight."""
    rng = np.random.default_rng(3)
    qt = jax.device_put(quantize(rng.standard_normal((48, 4864)).astype(np.float32), fmt))
    x = jnp.asarray(rng.standard_normal((1, 4864)), jnp.float32)
    compiled = jax.jit(qmatmul_xla).lower(x, qt).compile()
    close(compiled(x, qt), x @ dequantize(qt).T, 1e-5)
    if jax.default_backend() == "cpu":
        lines = compiled.as_text().split("ENTRY", 1)[1].splitlines()
        weight_sized = re.compile(r"= f32\[\d\d+,\d+\].* (fusion|copy|transpose)\(")
        written = [line for line in lines if weight_sized.search(line)]
        assert not written, f"the weight is written out before the product: {written}"
        products = [line for line in lines if "kind=kLoop" in line and "dot_general" in line]
        assert len(products) >= 2


@pytest.mark.parametrize("fmt", ["F32", "U8M", "Q8F", "Q4_K"])
def test_gemm_dtype_takes_bfloat16_operands_from_the_gemm_rows(fmt):
    """`gemm_dtype` (GEMMs on a CPU with bfloat16 dots): a product of CPU_GEMM_ROWS rows or more (a
    decode batch, a prompt chunk) is the f32-accumulated dot of x and W both rounded to bfloat16, in x's
    dtype; one to CPU_GEMV_ROWS rows (single-stream decode) are the very same as without it."""
    qt = packed(fmt)
    w = dequantize(qt)
    bf16 = ops.resolve("qmatmul", "xla_bf16")
    for rows in range(1, qmatmul.CPU_GEMM_ROWS):
        x = inputs(fmt, rows)
        np.testing.assert_array_equal(np.asarray(bf16(x, qt)), np.asarray(qmatmul_xla(x, qt)))
    for rows in (qmatmul.CPU_GEMM_ROWS, qmatmul.CPU_FEW_ROWS, qmatmul.CPU_FEW_ROWS + 1):
        x = inputs(fmt, rows)
        y = bf16(x, qt)
        rounded = jnp.matmul(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32
        )
        assert y.dtype == jnp.float32
        close(y, rounded, 1e-5)
        exact = x @ w.T
        assert np.max(np.abs(np.asarray(y) - np.asarray(exact))) > 1e-4 * np.max(np.abs(np.asarray(exact)))
        close(y, exact, 2e-2)


def _dot_operand_dtypes(compiled_text: str) -> set[str]:
    """The element types of the operands of every dot in a compiled module's text."""
    found = set()
    for computation in compiled_text.split("\n\n"):
        if " dot(" in computation:
            header = computation.strip().splitlines()[0]
            found |= set(re.findall(r": (\w+)\[", header.split("->")[0]))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bfloat16 dots")
@pytest.mark.parametrize("fmt", ["F32", "U8M", "Q8F"])
def test_a_bfloat16_gemm_compiles_to_a_bfloat16_dot(fmt):
    """The GEMM of a decode batch or a head slice runs on bfloat16 operands, not a dot XLA:CPU upcast to
    f32: written as `matmul(x, W.T)` the compiled dot took f32 operands (the rounding kept, the speed
    not); fails on that form."""
    qt = packed(fmt)
    bf16 = ops.resolve("qmatmul", "xla_bf16")
    for rows in (qmatmul.CPU_GEMM_ROWS, 32):
        x = jax.ShapeDtypeStruct((rows, qt.out_in[1]), jnp.float32)
        text = jax.jit(bf16).lower(x, qt).compile().as_text()
        assert _dot_operand_dtypes(text) == {"bf16"}, text


def test_the_row_tiles_are_the_xla_kernels_below_the_gemm_rows():
    """Which products read a packed weight a row or tile at a time (what the decoder keeps in its stack
    and the head leaves whole for): the XLA kernel's few rows of byte-code formats on CPU, and with
    bfloat16 GEMMs only those below CPU_GEMM_ROWS."""
    xla, bf16, pallas = (ops.resolve("qmatmul", name) for name in ("xla", "xla_bf16", "pallas"))
    cpu = jax.default_backend() == "cpu"
    assert ops.takes_row_tiles(xla, qmatmul.CPU_FEW_ROWS, "U8M") is cpu
    assert ops.takes_row_tiles(bf16, qmatmul.CPU_GEMM_ROWS - 1, "U8M") is cpu
    assert not ops.takes_row_tiles(bf16, qmatmul.CPU_GEMM_ROWS, "U8M")
    assert not ops.takes_row_tiles(xla, 1, "U8M")
    assert not ops.takes_row_tiles(xla, qmatmul.CPU_FEW_ROWS + 1, "U8M")
    assert not ops.takes_row_tiles(xla, 8, "Q4_K")  # nibbles: one product whole
    assert not ops.takes_row_tiles(pallas, 8, "U8M")
    # the decoder's in-place layer loop reads the dtype from the kernels' choice (a mesh wraps the op)
    assert ops.chosen_gemm_dtype(ops.Kernels()) is None
    assert ops.chosen_gemm_dtype(ops.Kernels.from_mapping({"qmatmul": "xla_bf16"})) == jnp.bfloat16


def test_float_gemm_dtype_takes_bfloat16_operands_from_the_gemm_rows():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((OUT, 96)), jnp.float32)
    matmul = ops.resolve("matmul", "xla_bf16")
    few = jnp.asarray(rng.standard_normal((qmatmul.CPU_GEMV_ROWS, 96)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(matmul(few, w)), np.asarray(qmatmul.matmul_t(few, w)))
    x = jnp.asarray(rng.standard_normal((qmatmul.CPU_GEMM_ROWS, 96)), jnp.float32)
    rounded = jnp.matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
    close(matmul(x, w), rounded, 1e-5)
    assert matmul(x, w, jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize(
    ("in_features", "block", "limit"),
    [
        (4864, 32, 16384),
        (8960, 256, 16384),
        (4096, 32, 16384),
        (2048, 32, 16384),
        (128, 32, 128),
        (96, 32, 64),
    ],
)
def test_gemv_spans_cover_the_row_in_whole_blocks_under_the_fusion_limit(
    monkeypatch, in_features, block, limit
):
    """A one-row product's pieces along `in`: the fewest that each stay under XLA:CPU's fusion limit, in
    whole blocks; one block each when a single block is already over it (a limit below any real one)."""
    monkeypatch.setattr(qmatmul, "CPU_GEMV_FUSION_BYTES", limit)
    spans = qmatmul.gemv_spans(in_features, block)
    assert spans[0][0] == 0 and spans[-1][1] == in_features
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(spans, spans[1:], strict=False))
    assert all(a % block == 0 for a, _ in spans)
    if in_features * 4 < limit:
        assert spans == [(0, in_features)]
    elif block * 4 >= limit:
        assert all(b - a == block for a, b in spans)
    else:
        assert all((b - a) * 4 < limit for a, b in spans)
        assert len(spans) == 1 or -(-in_features // (len(spans) - 1) // block) * block * 4 >= limit
