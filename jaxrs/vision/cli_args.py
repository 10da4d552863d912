"""Command-line flags for the images a request may bring (`jaxrs run` and `jaxrs serve`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxrs.vision.media import MediaPolicy


def add_media_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (vision-language models)")
    g.add_argument(
        "--mmproj", metavar="FILE", help="llama.cpp mmproj GGUF (CLIP + projector) for a GGUF model"
    )
    g.add_argument("--allowed-local-media-path", metavar="DIR", help="file:// image URLs may read under DIR")
    g.add_argument("--limit-images-per-prompt", type=int, default=MediaPolicy.limit_images)
    g.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=[],
        metavar="HOST",
        help="http(s) image hosts (default: any)",
    )
    g.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="let image URLs reach loopback/private addresses",
    )
    g.add_argument("--media-timeout", type=float, default=MediaPolicy.timeout, help="seconds per image fetch")
    g.add_argument(
        "--max-image-mb", type=float, default=MediaPolicy.max_bytes / 2**20, help="largest image file"
    )


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The policy the flags describe (the defaults where a command has none of them)."""
    if not hasattr(args, "limit_images_per_prompt"):
        return MediaPolicy()
    local = args.allowed_local_media_path
    return MediaPolicy(
        allowed_local_media_path=Path(local).expanduser() if local else None,
        allowed_domains=tuple(args.allowed_media_domains),
        allow_private=args.allow_private_media_urls,
        timeout=args.media_timeout,
        max_bytes=int(args.max_image_mb * 2**20),
        limit_images=args.limit_images_per_prompt,
    )
