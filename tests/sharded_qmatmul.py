"""The `qmatmul` op per shard on simulated CPU devices: packed weights placed as `shard_params` places
them, the op traced under the mesh, against the unsharded XLA reference. Prints one JSON line: per
case, the largest difference from the reference and which primitives the traced step holds.

Run as its own process with the device count set before JAX starts (`test_parallel_sharded_kernels.py`
does): `XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharded_qmatmul`.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxrs.ops import Kernels, qmatmul_xla
from jaxrs.parallel.mesh import tensor_mesh
from jaxrs.parallel.shardings import leaf_spec
from jaxrs.parallel.split_tensor import SplitTensor, split_of
from jaxrs.quant import quantize

# (case, format, parameter path, [out, in], devices): column-parallel weights split their outputs,
# row-parallel ones their inputs in whole blocks (Q4_K: 256, Q8_0: 32)
CASES = [
    ("q4_k-column", "Q4_K", ("layers", "mlp", "gate_proj", "weight"), (48, 256), 4),
    ("q4_k-row", "Q4_K", ("layers", "mlp", "down_proj", "weight"), (40, 512), 2),
    ("q8_0-column", "Q8_0", ("layers", "attn", "q_proj", "weight"), (64, 96), 8),
    ("q8_0-row", "Q8_0", ("layers", "attn", "o_proj", "weight"), (24, 256), 8),
    ("q8_0-head", "Q8_0", ("lm_head", "weight"), (96, 64), 4),
    ("q8_0-whole", "Q8_0", ("layers", "mlp", "router", "weight"), (8, 64), 4),  # replicated
]
PRIMITIVES = ("shard_map", "pallas_call", "psum")


def run(fmt, path, out_in, devices, kernel: str, *, mark: bool = True) -> dict:
    """A random weight packed in `fmt`, placed on `devices` devices as `shard_params` places it (with
    `mark`, as the `SplitTensor` it makes), through the op `kernel` under the mesh."""
    whole = quantize(np.random.default_rng(sum(out_in)).normal(0, 0.1, out_in).astype(np.float32), fmt)
    spec = leaf_spec(path, whole, devices)
    qt = SplitTensor(whole, split_of(spec, whole.ndim)) if mark else whole
    mesh = tensor_mesh(devices)
    qt = jax.device_put(qt, NamedSharding(mesh, spec))
    x = np.random.default_rng(1).normal(0, 1, (2, 3, out_in[1])).astype(np.float32)
    want = np.asarray(jax.jit(qmatmul_xla)(x, whole))
    kernels = Kernels.from_mapping({"qmatmul": kernel})
    step = jax.jit(lambda x, w: kernels.get("qmatmul")(x, w))
    with jax.set_mesh(mesh):
        traced = str(jax.make_jaxpr(step)(x, qt))
        got = np.asarray(step(x, qt))
    return {
        "error": float(np.max(np.abs(got - want))),
        "scale": float(np.max(np.abs(want))),
        "shape": list(got.shape),
        "holds": [p for p in PRIMITIVES if p in traced],
    }


def main() -> int:
    jax.config.update("jax_default_matmul_precision", "highest")
    out = {}
    for name, fmt, path, out_in, devices in CASES:
        out[name] = run(fmt, path, out_in, devices, "pallas")
        print(name, out[name], file=sys.stderr, flush=True)
    name, fmt, path, out_in, devices = CASES[1]
    out["q4_k-row-xla"] = run(fmt, path, out_in, devices, "xla")  # any implementation runs per shard
    out["q4_k-row-unmarked"] = run(fmt, path, out_in, devices, "pallas", mark=False)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
