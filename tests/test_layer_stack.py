"""Stacked parameters filled in place: one layer's host copies at a time, aligned buffers that XLA:CPU
uses as device arrays without copying them, mixed packed formats stacked as `unify_formats` stacks them,
long rows in XLA:CPU's layouts stored in contiguous pieces."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import LlamaConfig

from jaxrs.loading.checkpoint import load_params, parameter_shapes
from jaxrs.loading.device_layout import cpu_row_spans
from jaxrs.loading.layer_stack import ALIGN, LayerStack, aligned_empty
from jaxrs.loading.model_config import config_from_hf
from jaxrs.models.registry import family
from jaxrs.quant import QuantizedTensor, stack
from jaxrs.quant.in_pieces import InPieces
from jaxrs.quant.quantize import quantize
from jaxrs.quant.transcode import cpu_layout, unify_formats
from pallas_kernels.qmatmul import gemv_spans

LAYERS = 8


def random_getter(cfg):
    """Fresh random f32 tensors in each checkpoint tensor's shape (one new host array per call, as a
    file-backed getter hands out)."""
    shapes, table = parameter_shapes(cfg), family(cfg.architecture).names.hf(cfg)
    by_name = {}
    for path, source in table.items():
        if path in shapes and path.startswith("layers."):
            by_name.update({f"model.layers.{i}.{source}": shapes[path][1:] for i in range(cfg.num_layers)})
        elif path in shapes:
            by_name[source] = shapes[path]
    rng = np.random.default_rng(0)
    return lambda name: rng.standard_normal(by_name[name], dtype=np.float32)


def test_filling_params_holds_one_layers_host_copy_at_a_time():
    raw = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg = config_from_hf(raw.to_dict(), Path("config.json"))
    layer_bytes = 512 * 128 * 4  # the largest per-layer tensor (gate, up, down)
    get = random_getter(cfg)
    tracemalloc.start()
    try:
        params = load_params(get, cfg, np.float32)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert params["layers"]["mlp"]["up_proj"]["weight"].shape == (LAYERS, 512, 128)
    # Stacking a list of layers held all of them beside the stack (and the device copy freed the
    # host array, so `now` was near 0): a peak of 2 x LAYERS x layer_bytes above what is left. Filled in
    # place, only the layer being written exists beside the stacks (which the device arrays keep).
    assert peak - now < 3 * layer_bytes, (peak - now) / layer_bytes


def test_aligned_host_arrays_become_device_arrays_without_a_copy():
    a = aligned_empty((3, 1000), np.int8)
    assert a.ctypes.data % ALIGN == 0 and a.shape == (3, 1000) and a.dtype == np.int8
    a[:] = 7
    on_device = jax.device_put(a)
    if jax.default_backend() == "cpu":
        assert on_device.unsafe_buffer_pointer() == a.ctypes.data
    assert int(on_device.sum()) == 21000


@pytest.mark.parametrize("order", [("Q5_0", "Q8_0", "Q4_0"), ("Q8_0", "Q4_0", "Q5_0")])
def test_mixed_formats_stack_as_unify_formats_does(order):
    rng = np.random.default_rng(1)
    tensors = [quantize(rng.standard_normal((16, 64), dtype=np.float32), fmt) for fmt in order]
    stacked = LayerStack(len(tensors), np.float32, "v_proj")
    for i in (1, 0, 2):  # any order
        stacked.set(i, tensors[i])
    got, want = stacked.value(), stack(unify_formats(tensors))
    assert got.fmt == want.fmt == "Q8_0" and got.out_in == want.out_in
    for name, array in want.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], array)


def test_float_layers_are_cast_and_packed_and_float_layers_do_not_mix():
    stacked = LayerStack(2, np.float16)
    stacked.set(0, np.ones((4, 32), np.float32))
    with pytest.raises(ValueError, match="mixes packed and float"):
        stacked.set(1, quantize(np.ones((4, 32), np.float32), "Q8_0"))
    with pytest.raises(ValueError, match="layers written"):
        stacked.value()
    stacked.set(1, np.full((4, 32), 2, np.float32))
    assert stacked.value().dtype == np.float16 and stacked.value()[1, 0, 0] == 2


def test_a_layer_of_another_shape_is_an_error():
    stacked = LayerStack(2, np.float32, "norm")
    stacked.set(0, np.ones((1, 32), np.float32))
    with pytest.raises(ValueError, match=r"norm: a layer of shape \(32,\)"):
        stacked.set(1, np.ones(32, np.float32))
    packed = LayerStack(2, np.float32, "up")
    packed.set(0, quantize(np.ones((4, 32), np.float32), "Q8_0"))
    with pytest.raises(ValueError, match=r"up: a layer of shape \(8, 32\)"):
        packed.set(1, quantize(np.ones((8, 32), np.float32), "Q8_0"))


def _cpu_layout_layers(fmts: tuple[str, ...], in_features: int) -> list:
    rng = np.random.default_rng(2)
    return [cpu_layout(quantize(rng.standard_normal((8, in_features), dtype=np.float32), f)) for f in fmts]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU layout's pieces")
@pytest.mark.parametrize("order", [("Q4_1", "Q4_1", "Q4_1"), ("Q4_0", "Q8_0", "Q4_1")])
def test_long_rows_in_the_cpu_layout_are_stacked_in_contiguous_pieces(order):
    # 4,864 inputs (Qwen2.5's down_proj): an f32 row of 19 KiB, over XLA:CPU's 16 KiB for a fused product
    tensors = _cpu_layout_layers(order, 4864)
    stacked = LayerStack(len(tensors), np.float32, "down_proj")
    for i in (2, 0, 1):
        stacked.set(i, tensors[i])
    got, want = stacked.value(), stack(unify_formats(tensors))
    assert isinstance(got, InPieces)
    assert got.spans == cpu_row_spans(want.fmt, want.out_in) == gemv_spans(4864, 32)
    assert len(got.spans) > 1 and got.fmt == want.fmt and got.shape == want.shape
    for piece in got.pieces:
        for array in piece.arrays.values():
            assert array.flags.c_contiguous and array.ctypes.data % ALIGN == 0
    for name, array in want.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], array)


def test_short_rows_experts_and_other_formats_stay_whole():
    short = LayerStack(2, np.float32, "up")
    for i, t in enumerate(_cpu_layout_layers(("Q4_1", "Q4_1"), 256)):
        short.set(i, t)
    assert type(short.value()) is QuantizedTensor
    nibbles = LayerStack(2, np.float32, "down")  # not a CPU layout: read whole, as before
    rng = np.random.default_rng(3)
    for i in range(2):
        nibbles.set(i, quantize(rng.standard_normal((8, 4864), dtype=np.float32), "Q6_K"))
    assert type(nibbles.value()) is QuantizedTensor
    experts = LayerStack(2, np.float32, "experts")
    for i in range(2):
        experts.set(i, stack(_cpu_layout_layers(("Q4_1", "Q4_1"), 4864)))
    assert type(experts.value()) is QuantizedTensor and experts.value().shape == (2, 2, 8, 4864)
