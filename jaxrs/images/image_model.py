"""`ImageModel`: the Python API for text-to-image, as `LLM` is for text.

    from jaxrs.images import ImageModel

    model = ImageModel("FLUX.1-schnell")  # a diffusers folder
    [image] = model.generate("a red fox in the snow", size="512x512", seed=7)
    image.save("fox.png")

Requests are checked before any work (`ImageRequestError`, a message naming the bad field); sizes are
multiples of 16 within [min_side, max_side] and batches are padded to a power of two, so the compiled
shapes are a fixed set: one per (batch bucket, size).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from PIL import Image

from jaxrs.errors import JaxrsError
from jaxrs.images.loading import load_pipeline
from jaxrs.images.prompt_tokens import load_tokenizer, token_ids
from jaxrs.ops import Kernels

log = logging.getLogger("jaxrs.images")

SIZE_STEP = 16
AUTO_SIDE = 1024  # the side of size="auto" (1024x1024, the default size)
SCHNELL_STEPS, DEV_STEPS, DEV_GUIDANCE = 4, 28, 3.5
MAX_STEPS = 100


class ImageRequestError(JaxrsError):
    """A generation request this model cannot serve (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    min_side: int = 64
    max_side: int = 2048
    max_images: int = 4


def parse_size(size: str | tuple[int, int], limits: ImageLimits) -> tuple[int, int]:
    """ "WxH" (or (width, height)) -> (width, height), checked against the limits; "auto" (OpenAI's
    default for its newer models) is the largest square up to 1024 the limits allow."""
    if isinstance(size, str) and size.strip().lower() == "auto":
        side = min(AUTO_SIDE, limits.max_side) // SIZE_STEP * SIZE_STEP
        size = (side, side)
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ImageRequestError(f"size must be 'WIDTHxHEIGHT', got {size!r}")
        size = (int(parts[0]), int(parts[1]))
    width, height = size
    for name, side in (("width", width), ("height", height)):
        if side % SIZE_STEP or not limits.min_side <= side <= limits.max_side:
            raise ImageRequestError(
                f"size: {name} {side} must be a multiple of {SIZE_STEP} "
                f"between {limits.min_side} and {limits.max_side}"
            )
    return width, height


def batch_bucket(n: int) -> int:
    """The compiled batch size that holds `n` images: the next power of two."""
    return 1 << (n - 1).bit_length()


class ImageModel:
    """A FLUX pipeline loaded from a diffusers folder (`transformer_file`: the transformer from a
    single-file checkpoint in Black Forest Labs' names instead), with ISQ for the transformer blocks."""

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: str = "float32",
        isq: str | None = None,
        transformer_file: str | Path | None = None,
        max_sequence_length: int = 512,
        limits: ImageLimits = ImageLimits(),
        kernels: dict[str, str] | None = None,
    ):
        self.source = str(path)
        if dtype == "auto":  # as the language models: f32 on CPU, bf16 on accelerators
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        started = time.perf_counter()
        self.pipeline = load_pipeline(
            path,
            dtype=jnp.dtype(dtype),
            isq=isq,
            transformer_file=transformer_file,
            kernels=Kernels.from_mapping(kernels),
        )
        folder = Path(path)
        self.clip_tokenizer, self.clip_length, self.clip_pad = load_tokenizer(folder / "tokenizer")
        self.t5_tokenizer, t5_max, self.t5_pad = load_tokenizer(folder / "tokenizer_2")
        self.t5_length = min(max_sequence_length, t5_max)
        self.limits = limits
        self._lock = threading.Lock()  # one generation at a time: each uses the whole machine
        log.info("loaded image model %s in %.1fs", self.source, time.perf_counter() - started)

    @property
    def guided(self) -> bool:
        return self.pipeline.guided

    def check(
        self,
        prompt: str,
        n: int,
        size: str | tuple[int, int],
        num_inference_steps: int | None = None,
        seed: int | None = None,
    ) -> tuple[int, int]:
        """Validate a request; returns (width, height)."""
        if seed is not None and not 0 <= seed < 2**32:
            raise ImageRequestError(f"seed must be between 0 and {2**32 - 1}, got {seed}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ImageRequestError("prompt must be a non-empty string")
        if not 1 <= n <= self.limits.max_images:
            raise ImageRequestError(f"n must be between 1 and {self.limits.max_images}, got {n}")
        if num_inference_steps is not None and not 1 <= num_inference_steps <= MAX_STEPS:
            raise ImageRequestError(f"num_inference_steps must be between 1 and {MAX_STEPS}")
        return parse_size(size, self.limits)

    def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: str | tuple[int, int] = "1024x1024",
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """`n` images for `prompt` (the same seed gives the same images). Steps default to 4 for a
        model without guidance (schnell) and 28 with (dev); `guidance_scale` (default 3.5) is ignored by
        a model without guidance."""
        width, height = self.check(prompt, n, size, num_inference_steps, seed)
        steps = num_inference_steps or (DEV_STEPS if self.guided else SCHNELL_STEPS)
        guidance = DEV_GUIDANCE if guidance_scale is None else float(guidance_scale)
        seed = secrets.randbits(31) if seed is None else int(seed)
        batch = batch_bucket(n)
        pipe, scale = self.pipeline, self.pipeline.vae_config.scale
        with self._lock:
            started = time.perf_counter()
            prompts = [prompt] * batch
            clip = token_ids(self.clip_tokenizer, prompts, self.clip_length, self.clip_pad)
            t5 = token_ids(self.t5_tokenizer, prompts, self.t5_length, self.t5_pad)
            txt, pooled = pipe.encode(clip, t5)

            def progress(step: int, total: int) -> None:
                log.info(
                    "image %dx%d x%d: step %d/%d (%.1fs)",
                    width,
                    height,
                    n,
                    step,
                    total,
                    time.perf_counter() - started,
                )
                if on_step is not None:
                    on_step(step, total)

            latents = pipe.noise(seed, batch, height, width)
            tokens = pipe.denoise(latents, txt, pooled, steps, guidance, progress)
            pixels = pipe.decode(tokens, height // scale, width // scale)
            log.info("image %dx%d x%d: done in %.1fs", width, height, n, time.perf_counter() - started)
        return [Image.fromarray(p) for p in pixels[:n]]
