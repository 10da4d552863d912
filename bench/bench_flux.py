"""Seconds per denoising step and per image of the FLUX pipeline with random weights, for a tiny config
and a mid-size one (FLUX's widths: a 3072-wide transformer, T5-XXL's 4096, CLIP-L's 768 and the real
VAE, at reduced depth).

    python bench/bench_flux.py [--configs tiny mid] [--size 256x256] [--steps 4] [--text-len 128] [--passes 3]

Per step: the median of the jitted transformer-plus-Euler step after the first (compiling) pass; per
image: the median of encode + all steps + decode for one image (encode and decode also apart).
Writes bench/results/flux.json.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from common import RESULTS, median, write_json

from jaxrs.images.clip_text import ClipTextConfig, ClipTextModel
from jaxrs.images.flow_match import SchedulerConfig
from jaxrs.images.flux_transformer import FluxConfig, FluxTransformer
from jaxrs.images.pipeline import Component, FluxPipeline
from jaxrs.images.t5_encoder import T5Config, T5Encoder
from jaxrs.images.vae_decoder import VaeConfig, VaeDecoder
from jaxrs.images.weights import abstract_state

CONFIGS = {
    "tiny": dict(
        flux=FluxConfig(16, 2, 2, 16, 2, 32, 24, True, (4, 6, 6)),
        t5=T5Config(64, 32, 8, 40, 2, 4, 8, 16, 1e-6, True, "gelu_tanh"),
        clip=ClipTextConfig(64, 24, 40, 2, 4, 77, 1e-5, "quick_gelu", 2),
        vae=VaeConfig(4, 3, (8, 16, 16, 16), 1, 4, True, 0.5, 0.1),
    ),
    "mid": dict(  # FLUX.1-dev widths; depth 1 double + 1 single block, 1 T5 layer, 1 CLIP layer
        flux=FluxConfig(64, 1, 1, 128, 24, 4096, 768, True, (16, 56, 56)),
        t5=T5Config(32128, 4096, 64, 10240, 1, 64, 32, 128, 1e-6, True, "gelu_tanh"),
        clip=ClipTextConfig(49408, 768, 3072, 1, 12, 77, 1e-5, "quick_gelu", 2),
        vae=VaeConfig(),
    ),
}


def random_component(make, seed: int) -> Component:
    graph, abstract = abstract_state(make)
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    # small random weights keep activations finite; speed does not depend on the values
    values = [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    return Component(graph, jax.tree.unflatten(tree, values))


def pipeline(cfg: dict) -> FluxPipeline:
    return FluxPipeline(
        cfg["flux"],
        random_component(lambda: FluxTransformer(cfg["flux"]), 0),
        cfg["vae"],
        random_component(lambda: VaeDecoder(cfg["vae"]), 1),
        random_component(lambda: ClipTextModel(cfg["clip"]), 2),
        random_component(lambda: T5Encoder(cfg["t5"]), 3),
        SchedulerConfig(shift=3.0, use_dynamic_shifting=True),
    )


def bench(name: str, width: int, height: int, steps: int, text_len: int, passes: int) -> dict:
    cfg = CONFIGS[name]
    pipe = pipeline(cfg)
    clip = np.ones((1, 77), np.int32)
    t5 = np.ones((1, text_len), np.int32)
    scale = pipe.vae_config.scale
    per_step, per_image, encode, decode = [], [], [], []
    for i in range(passes + 1):
        started = time.perf_counter()
        txt, pooled = jax.block_until_ready(pipe.encode(clip, t5))
        stamps = [time.perf_counter()]
        record = stamps.append
        tokens = pipe.denoise(
            pipe.noise(i, 1, height, width),
            txt,
            pooled,
            steps,
            3.5,
            lambda s, n, record=record: record(time.perf_counter()),
        )
        pipe.decode(tokens, height // scale, width // scale)
        if i:  # the first pass compiles
            per_image.append(time.perf_counter() - started)
            per_step += list(np.diff(stamps))
            encode.append(stamps[0] - started)
            decode.append(per_image[-1] - (stamps[-1] - started))
    params = sum(x.size for x in jax.tree.leaves(pipe.transformer.params))
    return {
        "config": name,
        "transformer_params": int(params),
        "size": f"{width}x{height}",
        "image_tokens": (height // scale // 2) * (width // scale // 2),
        "text_tokens": text_len,
        "steps": steps,
        "s_per_step": median(per_step),
        "s_per_image": median(per_image),
        "s_encode": median(encode),
        "s_decode": median(decode),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    rows = [bench(c, width, height, args.steps, args.text_len, args.passes) for c in args.configs]
    print(f"device: {jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.1f}")
    print(
        "| config | transformer params | size | image+text tokens | s/step | s/image (steps) "
        "| encode s | decode s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['transformer_params'] / 1e6:.1f} M | {r['size']} | "
            f"{r['image_tokens']}+{r['text_tokens']} | {r['s_per_step']:.3f} | "
            f"{r['s_per_image']:.2f} ({r['steps']}) | {r['s_encode']:.2f} | {r['s_decode']:.2f} |"
        )
    write_json(RESULTS / "flux.json", {"rows": rows, "device": jax.devices()[0].device_kind})


if __name__ == "__main__":
    main()
