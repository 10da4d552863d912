"""The vision tower as jitted calls: one executable per tile-count bucket (and per extras shape), each
compiled once, counted, and warmed up on request. Images without extras share a call, their tiles stacked
and padded to a power of two; an image with extras (tiling layouts) runs alone."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jaxrs.vision.image_input import ImageInput
from jaxrs.vision.registry import Processor, VisionFamily, feature_rows
from pallas_kernels.shapes import next_power_of_2

log = logging.getLogger("jaxrs")


@functools.partial(jax.jit, static_argnames=("graph", "static"))
def _tower(
    graph: nnx.GraphDef, params: dict, pixel_values: jax.Array, extras: dict, static: tuple = ()
) -> jax.Array:
    """`static`: `(name, values)` pairs of the family's `static_extras`, handed over as host arrays."""
    return nnx.merge(graph, params)(pixel_values, **extras, **{k: np.asarray(v) for k, v in static})


class VisionModel:
    """A loaded tower (graph + parameters), its processor, and the encode calls over them."""

    def __init__(
        self, family: VisionFamily, processor: Processor, graph: nnx.GraphDef, params: dict, dtype: jnp.dtype
    ):
        self.family, self.processor, self.graph, self.params = family, processor, graph, params
        self.dtype = jnp.dtype(dtype)
        self.shapes: set[tuple] = set()  # (tiles, extras shapes) compiled
        self.seconds = 0.0  # wall time in tower calls
        self.images_encoded = 0
        self._lock = threading.Lock()

    @property
    def marker(self) -> str:
        return self.processor.marker

    def compile_count(self) -> int:
        return len(self.shapes)

    def _call(self, pixels: np.ndarray, extras: dict) -> np.ndarray:
        fixed = self.family.static_extras
        static = tuple((k, tuple(np.asarray(extras[k]).tolist())) for k in sorted(extras) if k in fixed)
        traced = {k: v for k, v in extras.items() if k not in fixed}
        key = (pixels.shape, tuple(sorted((k, v.shape) for k, v in traced.items())), static)
        began = time.perf_counter()
        out = _tower(
            self.graph,
            self.params,
            jnp.asarray(pixels, self.dtype),
            {k: jnp.asarray(v) for k, v in traced.items()},
            static,
        )
        out = np.asarray(out.astype(jnp.float32))
        with self._lock:
            if key not in self.shapes:
                self.shapes.add(key)
                log.info(
                    "compiled vision tower %s in %.2f s (%d shapes)",
                    key,
                    time.perf_counter() - began,
                    len(self.shapes),
                )
            else:
                self.seconds += time.perf_counter() - began
        return out

    def encode(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        """Feature rows `[feature_rows(image), hidden]` of each image, in order."""
        out: list[np.ndarray | None] = [None] * len(images)
        plain = [i for i, im in enumerate(images) if not im.extras and self.family.batchable]
        if plain:
            tiles = [images[i].pixel_values for i in plain]
            stacked = np.concatenate(tiles)
            padded = np.zeros((next_power_of_2(len(stacked)), *stacked.shape[1:]), np.float32)
            padded[: len(stacked)] = stacked
            rows = self._call(padded, {})
            per_tile = rows.shape[0] // len(padded)
            at = 0
            for i, t in zip(plain, tiles, strict=True):
                out[i] = rows[at * per_tile : (at + len(t)) * per_tile][: feature_rows(images[i])]
                at += len(t)
        for i, im in enumerate(images):
            if out[i] is None:
                out[i] = self._call(im.pixel_values, dict(im.extras))[: feature_rows(im)]
        self.images_encoded += len(images)
        return out  # type: ignore[return-value]

    def warmup(self, counts: Sequence[int] = (1, 2)) -> int:
        """Compile the tower for the shapes requests will bring: each of the processor's `warmup_sizes`
        (a tile for plain towers, each pinpoint for tiled ones) alone, and `counts` images at once where
        images share calls. Returns how many shapes compiled."""
        before = self.compile_count()
        sizes = getattr(self.processor, "warmup_sizes", [(224, 224)])
        for w, h in sizes:
            example = self.processor(Image.new("RGB", (w, h)))
            for n in counts if self.family.batchable and not example.extras else (1,):
                self.encode([example] * n)
        self.images_encoded = 0
        return self.compile_count() - before
