"""The device mesh a tensor-parallel engine runs on: one axis, `tp`, over a slice of the devices."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxrs.errors import JaxrsError

TP = "tp"  # the mesh axis tensor-parallel weights and the KV cache's heads are split along


def tensor_mesh(size: int, *, first: int = 0, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over `size` devices, starting at device `first` of `devices` (default: all of
    this process's view, `jax.devices()`, which spans every process once `jax.distributed` is up).
    Auto axes: the compiler partitions the step from the weights' and the cache's shardings."""
    pool = list(jax.devices() if devices is None else devices)
    if size < 1:
        raise JaxrsError(f"tensor_parallel_size must be at least 1, not {size}")
    if first + size > len(pool):
        raise JaxrsError(
            f"tensor_parallel_size {size} needs devices {first}..{first + size - 1}, but there are "
            f"{len(pool)} {pool[0].platform.upper()} devices (on CPU, XLA_FLAGS="
            "--xla_force_host_platform_device_count=N simulates N)"
        )
    return Mesh(np.asarray(pool[first : first + size]), (TP,), axis_types=(AxisType.Auto,))


def mesh_size(mesh: Mesh | None) -> int:
    """Devices the tensor axis spans (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[TP])
