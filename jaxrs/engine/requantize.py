"""Re-quantizing a live engine's weights (runtime ISQ): how the weights are read again, and the report.

The weights are read again from the model's source rather than converted on the device: the result is
exactly what a fresh load with `isq=<format>` gives (same bytes, same outputs), and a GGUF that was
loaded packed is re-quantized from its dequantized float values rather than from the old format's
packed blocks. The engine itself (`Engine.requantize`) swaps the weights between steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from jaxrs.engine.sequence import Sequence
from jaxrs.errors import JaxrsError
from jaxrs.loading import LoadedModel, load_model

Reloader = Callable[[str], LoadedModel]  # format name -> the model loaded again, quantized to it


class RequantizeError(JaxrsError):
    """Reading the weights in the new format failed; the engine serves the old ones again."""


def source_reloader(
    source: str, dtype: jnp.dtype, tokenizer: str | None = None, isq_embeddings: str = "q8_0"
) -> Reloader:
    """Load `source` (a local path, as `LoadedModel.source` records it) again with ISQ to a format.

    Always unpacked: packed GGUF tensors would pass through ISQ untouched, in their old format.
    `tokenizer` is the folder the model was loaded with, if not its own (so loading it again works);
    `isq_embeddings` keeps the embedding and head as the model was loaded (see `load_model`).
    """

    def reload(fmt: str) -> LoadedModel:
        return load_model(source, dtype=dtype, tokenizer=tokenizer, isq=fmt, isq_embeddings=isq_embeddings)

    return reload


@dataclasses.dataclass
class Requantized:
    """What a re-ISQ changed. `cut` holds the sequences finished ("length") because a smaller KV pool
    can no longer hold them; a driver must report them to their callers."""

    ggml_type: str
    weight_bytes_before: int
    weight_bytes_after: int
    kv_blocks_before: int
    kv_blocks_after: int
    max_model_len: int
    requeued: int  # sequences that were running and will recompute their tokens
    seconds: float
    cut: list[Sequence] = dataclasses.field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        """The JSON-ready report (everything but `cut`, which is counted)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cut"}
        return fields | {"cut": len(self.cut), "seconds": round(self.seconds, 3)}
