"""The batch-invariant mode (`EngineConfig.batch_invariant`, `--batch-invariant`): every row's logits are
the same bits whatever other rows share its step, so a seeded request draws the same tokens alone, in a
batch of any size, or under a speculative verify.

The sampler's draws already depend only on a row's seed and token index (`sampling`); what differed
were the logits' last bits, because XLA:CPU multiplies a weight by a different kernel at each number of
rows, attends by another form once the longest row widens the block tables, and sums a norm's row in
an order set by the whole batch's shape. In this mode every weight product, packed or float, every
attention call and every norm's sum take one form whatever the rows (`pallas_kernels.batch_invariant`):
the "invariant" implementations of the `qmatmul`, `matmul`, `paged_attention` and `row_sum` ops. Its
cost: README, "Batch-invariant mode".
"""

from __future__ import annotations

import jax

from jaxrs.config import ModelConfig
from jaxrs.engine.options import EngineConfig
from jaxrs.errors import JaxrsError
from jaxrs.ops import Kernels

KERNELS = {
    "qmatmul": "invariant",
    "matmul": "invariant",
    "paged_attention": "invariant",
    "row_sum": "invariant",
}


def invariant_kernels(
    config: EngineConfig, kernels: Kernels, cfg: ModelConfig | None = None, platform: str | None = None
) -> Kernels:
    """The engine's kernel choice in the batch-invariant mode, serving the model `cfg`: the invariant ops
    over `kernels`. Choosing another implementation of one of them, or a part the mode does not cover,
    is an error naming it."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        raise JaxrsError(f"batch_invariant runs on CPU (XLA:CPU's products); this engine runs on {platform}")
    if config.lora is not None or config.xlora is not None:
        raise JaxrsError("batch_invariant does not cover LoRA adapters (their products follow the batch)")
    if cfg is not None and cfg.num_experts:
        raise JaxrsError(
            f"batch_invariant does not cover mixture-of-experts models ({cfg.architecture}): "
            "their expert products follow the batch"
        )
    chosen = dict(kernels.choice)
    for op, name in KERNELS.items():
        if chosen.get(op, name) != name:
            raise JaxrsError(f"batch_invariant takes the {op!r} kernel {name!r}; {chosen[op]!r} was chosen")
    return Kernels.from_mapping({**chosen, **KERNELS})
