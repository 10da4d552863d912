"""The command line's LoRA flags (vLLM's names) and X-LoRA's (mistral.rs's), and the `LLM` keywords
they become."""

from __future__ import annotations

import argparse

from jaxrs.lora.config import parse_lora_arg


def add_lora_args(p: argparse.ArgumentParser) -> None:
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--lora",
        "--lora-modules",
        dest="lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the peft LoRA adapter at PATH as model NAME (repeatable)",
    )
    lora.add_argument("--max-loras", type=int, help="adapters loaded at once (default 4)")
    lora.add_argument("--max-lora-rank", type=int, help="the largest adapter rank served (default 16)")
    lora.add_argument(
        "--enable-runtime-lora",
        action="store_true",
        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter while serving",
    )
    xlora = p.add_argument_group("X-LoRA")
    xlora.add_argument("--xlora", metavar="PATH", help="serve the X-LoRA model at PATH")
    xlora.add_argument("--xlora-order", metavar="FILE", help="mistral.rs's ordering file")
    xlora.add_argument(
        "--tgt-non-granular-index",
        type=int,
        metavar="K",
        help="keep each sequence's scalings after K generated tokens (mistral.rs's non-granular scalings)",
    )


def lora_kwargs(args: argparse.Namespace) -> dict:
    """`LLM` keywords from the LoRA flags (none when no flag is given)."""
    adapters = dict(parse_lora_arg(text) for text in getattr(args, "lora", None) or [])
    options = dict(
        lora_adapters=adapters or None,
        max_loras=getattr(args, "max_loras", None),
        max_lora_rank=getattr(args, "max_lora_rank", None),
        enable_runtime_lora=getattr(args, "enable_runtime_lora", False) or None,
        xlora=getattr(args, "xlora", None),
        xlora_order=getattr(args, "xlora_order", None),
        tgt_non_granular_index=getattr(args, "tgt_non_granular_index", None),
    )
    return {k: v for k, v in options.items() if v is not None}
