"""The operands of products of 4 or more rows on CPU (`gemm_dtype`): which kernels each choice takes, how
a CPU's bfloat16 dots are found, and what an engine's prefill and decode batches compute under each."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrs.engine import matmul_dtype
from jaxrs.engine.matmul_dtype import cpu_has_bf16_dots, gemm_kernels
from jaxrs.errors import JaxrsError
from jaxrs.ops import Kernels
from tests.conftest import save_tiny_llama

AVX512 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni"


@pytest.mark.parametrize(
    ("flags", "native"),
    [(AVX512, False), (AVX512 + " avx512_bf16", True), ("flags\t: fpu amx_tile amx_bf16 amx_int8", True)],
)
def test_bf16_dots_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert cpu_has_bf16_dots(cpuinfo) is native
    assert cpu_has_bf16_dots(tmp_path / "absent") is False  # not Linux: never assumed


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(matmul_dtype, "cpu_has_bf16_dots", lambda: True)


def choice(kernels: Kernels) -> dict[str, str]:
    return dict(kernels.choice)


def test_auto_takes_bfloat16_for_packed_weights_only_where_the_cpu_has_it(bf16_cpu, monkeypatch):
    assert choice(gemm_kernels("auto", Kernels(), "cpu")) == {"qmatmul": "xla_bf16"}
    assert choice(gemm_kernels("bfloat16", Kernels(), "cpu")) == {
        "qmatmul": "xla_bf16",
        "matmul": "xla_bf16",
    }
    assert choice(gemm_kernels("float32", Kernels(), "cpu")) == {}
    assert choice(gemm_kernels("auto", Kernels(), "gpu")) == {}  # products take the compute dtype
    monkeypatch.setattr(matmul_dtype, "cpu_has_bf16_dots", lambda: False)
    assert choice(gemm_kernels("auto", Kernels(), "cpu")) == {}  # emulated bfloat16 is slower
    assert choice(gemm_kernels("bfloat16", Kernels(), "cpu"))["qmatmul"] == "xla_bf16"


def test_a_chosen_kernel_stays_and_bfloat16_beside_it_is_an_error(bf16_cpu):
    mine = Kernels.from_mapping({"qmatmul": "pallas"})
    assert gemm_kernels("auto", mine, "cpu") == mine
    with pytest.raises(JaxrsError, match="'qmatmul' kernel 'xla_bf16'; 'pallas' was chosen"):
        gemm_kernels("bfloat16", mine, "cpu")
    invariant = Kernels.from_mapping({"qmatmul": "invariant", "matmul": "invariant"})
    assert gemm_kernels("auto", invariant, "cpu") == invariant  # the batch-invariant mode's
    with pytest.raises(JaxrsError, match="gemm_dtype must be one of auto, float32, bfloat16"):
        gemm_kernels("float16", Kernels(), "cpu")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def prompt_logprobs(model: str, **options) -> tuple[np.ndarray, dict[str, str]]:
    """The log-probabilities of a 96-token prompt (a prefill of more rows than the few-row products take)
    under an engine with ISQ-packed weights, and its kernel choice."""
    from jaxrs import LLM

    llm = LLM(model, isq="Q8_0", max_model_len=256, kv_cache_mb=8, **options)
    ids = list(np.random.default_rng(0).integers(3, 256, 96))
    return np.array(llm.score([ids[:1]], [ids[1:]])[0]), choice(llm.engine.kernels)


def test_an_engine_prefills_packed_weights_in_bfloat16_under_auto(tiny_model, bf16_cpu):
    exact, f32_kernels = prompt_logprobs(tiny_model, gemm_dtype="float32")
    auto, auto_kernels = prompt_logprobs(tiny_model)
    assert f32_kernels == {} and auto_kernels == {"qmatmul": "xla_bf16"}
    assert not np.array_equal(auto, exact)  # the products' operands were rounded
    np.testing.assert_allclose(auto, exact, atol=0.05)


def test_a_decode_batch_takes_bfloat16_under_auto(tiny_model, bf16_cpu):
    """Four requests at once decode 4-row GEMMs: bfloat16 operands under "auto", their tokens'
    log-probabilities within that rounding of what f32 products give the same tokens (one row a step
    keeps f32: `test_qmatmul.py`)."""
    from jaxrs import LLM, SamplingParams

    prompts = [list(np.random.default_rng(i).integers(3, 256, 3)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    auto = LLM(tiny_model, isq="Q8_0", max_model_len=64, kv_cache_mb=4)
    outs = [out.outputs[0] for out in auto.generate(prompts, params)]
    exact = LLM(tiny_model, isq="Q8_0", max_model_len=64, kv_cache_mb=4, gemm_dtype="float32")
    scored = np.concatenate(exact.score(prompts, [out.token_ids for out in outs]))
    got = np.array([lp.logprob for out in outs for lp in out.logprobs])
    assert np.abs(got - scored).max() > 1e-3  # rounded operands (f32 products part by ~1e-6)
    np.testing.assert_allclose(got, scored, atol=0.05)
