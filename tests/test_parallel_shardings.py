"""Tensor-parallel placement rules, checked without several devices: which axis each parameter splits
on, KV heads repeated for more devices than heads, and the errors for shapes that do not split."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrs.config import ModelConfig
from jaxrs.errors import JaxrsError
from jaxrs.parallel import data_parallel
from jaxrs.parallel.data_parallel import ReplicaRouter, replica_meshes
from jaxrs.parallel.mesh import tensor_mesh
from jaxrs.parallel.shardings import kv_heads_on, leaf_spec, repeat_kv_rows, shard_params, split_axis
from jaxrs.parallel.split_tensor import SplitTensor
from jaxrs.quant import quantize, stack
from jaxrs.quant.in_pieces import InPieces, split_in


def config(heads: int = 8, kv_heads: int = 2, head_dim: int = 4) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


@pytest.mark.parametrize(
    "path, axis",
    [
        (("layers", "attn", "q_proj", "weight"), -2),
        (("layers", "attn", "k_proj", "bias"), -1),
        (("layers", "mlp", "gate_proj", "weight"), -2),  # also Mixtral's stacked experts [L, E, out, in]
        (("layers", "attn", "o_proj", "weight"), -1),
        (("layers", "mlp", "down_proj", "weight"), -1),
        (("layers", "mlp", "down_proj", "bias"), None),  # added once, after the all-reduce
        (("embed", "weight"), -2),
        (("lm_head", "weight"), -2),
        (("layers", "input_norm", "weight"), None),
        (("layers", "mlp", "router", "weight"), None),
        (("final_norm", "weight"), None),
    ],
)
def test_split_axis(path, axis):
    assert split_axis(path) == axis


def test_kv_heads_split_or_repeat():
    cfg = config(heads=8, kv_heads=2)
    assert [kv_heads_on(cfg, n) for n in (1, 2, 4, 8)] == [2, 2, 4, 8]
    with pytest.raises(JaxrsError, match="must divide the model's 8 attention heads"):
        kv_heads_on(cfg, 3)
    with pytest.raises(JaxrsError, match="must divide the model's 4 KV heads or be a multiple"):
        kv_heads_on(config(heads=12, kv_heads=4), 6)


def test_repeated_kv_rows_keep_each_head_whole():
    """Head h of the repeated projection is head h // 2 of the model's (two devices per KV head)."""
    cfg = config(heads=8, kv_heads=2, head_dim=4)
    weight = np.arange(2 * 4 * 3, dtype=np.float32).reshape(1, 8, 3)  # [layers, kv_heads * head_dim, in]
    out = np.asarray(repeat_kv_rows(weight, cfg, 4, -2))
    heads = out.reshape(1, 4, 4, 3)
    for h in range(4):
        np.testing.assert_array_equal(heads[0, h], weight.reshape(1, 2, 4, 3)[0, h // 2])
    assert repeat_kv_rows(out, cfg, 4, -2) is out  # already repeated: unchanged
    packed = repeat_kv_rows(quantize(np.ones((8, 32), np.float32), "Q8_0"), cfg, 4, -2)
    assert packed.out_in == (16, 32) and packed.arrays["qs"].shape == (16, 32)


def test_leaf_specs_and_packed_block_alignment():
    dense = np.zeros((2, 64, 128), np.float32)
    assert leaf_spec(("layers", "attn", "q_proj", "weight"), dense, 4) == P(None, "tp", None)
    assert leaf_spec(("layers", "attn", "o_proj", "weight"), dense, 4) == P(None, None, "tp")
    assert leaf_spec(("embed", "weight"), np.zeros((65, 8)), 2) == P()  # odd vocabulary: whole
    with pytest.raises(JaxrsError, match="does not divide layers.mlp.up_proj.weight's dimension 64"):
        leaf_spec(("layers", "mlp", "up_proj", "weight"), dense, 3)
    packed = quantize(np.ones((64, 512), np.float32), "Q4_K")  # blocks of 256 inputs
    assert leaf_spec(("layers", "mlp", "down_proj", "weight"), packed, 2) == P(None, "tp")
    with pytest.raises(JaxrsError, match=r"down_proj.weight is packed as Q4_K in blocks of 256"):
        leaf_spec(("layers", "mlp", "down_proj", "weight"), packed, 4)
    assert leaf_spec(("layers", "mlp", "up_proj", "weight"), packed, 4) == P("tp", None)  # rows: any


def test_too_few_devices_is_a_clear_error():
    with pytest.raises(JaxrsError, match="tensor_parallel_size 512 needs devices 0..511"):
        tensor_mesh(512)
    with pytest.raises(JaxrsError, match="data_parallel_size 256 x tensor_parallel_size 2 needs 512"):
        replica_meshes(256, 2)
    assert replica_meshes(1, 1) == [None]


def test_router_prefers_the_least_loaded_replica_then_the_prompts_own():
    router = object.__new__(ReplicaRouter)
    router.drivers, router.in_flight = [None, None, None], [2, 0, 0]
    prompt = list(range(40))
    first = router.pick(prompt)
    assert first in (1, 2)
    assert router.pick(prompt[: data_parallel.PREFIX_TOKENS] + [7]) == first  # same prefix, same replica
    router.in_flight = [0, 3, 3]
    assert router.pick(prompt) == 0


def test_a_weight_in_pieces_is_placed_whole():
    """A stacked weight stored in pieces along `in` (XLA:CPU's long rows) reaches the mesh joined: the
    mesh splits the whole weight its own way."""
    whole = stack(
        [
            quantize(np.random.default_rng(i).standard_normal((8, 64), dtype=np.float32), "Q8_0")
            for i in range(2)
        ]
    )
    params = {"layers": {"mlp": {"down_proj": {"weight": split_in(whole, [(0, 32), (32, 64)])}}}}
    shard_params(config(), params, tensor_mesh(1))
    placed = params["layers"]["mlp"]["down_proj"]["weight"]
    assert (
        isinstance(placed, SplitTensor) and not isinstance(placed, InPieces) and placed.shape == whole.shape
    )
    for name, array in whole.arrays.items():
        np.testing.assert_array_equal(np.asarray(placed.arrays[name]), array)
