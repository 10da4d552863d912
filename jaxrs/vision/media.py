"""Images from request content: `data:` URLs, http(s) URLs (a timeout, a byte limit, an optional host
allow-list; loopback, private and link-local addresses refused unless allowed; no redirects), `file://`
paths under an allowed folder only, raw bytes and PIL images. Every failure is an `ImageError` naming the
image and the reason; a decompression bomb is refused from its header, before its pixels are decoded."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps

from jaxrs.errors import JaxrsError

ORIENTATION = 0x0112  # the EXIF orientation tag


class ImageError(JaxrsError):
    """An image a request refers to that cannot be used (unreadable, too large, not allowed...).
    `image`: the name the loader gave the image (`load_images`' `names`), when it gave one."""

    image: str | None = None


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What a request may make the server read. `allowed_domains` empty: any public host."""

    allowed_local_media_path: Path | None = None
    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    timeout: float = 10.0
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    limit_images: int = 8


def decode_image(data: bytes, policy: MediaPolicy, what: str) -> Image.Image:
    """The decoded image of `data`, checked for size before its pixels are decoded."""
    if len(data) > policy.max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes; the limit is {policy.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{what} is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is refused as a decompression bomb ({e})") from None
    return upright(checked(image, policy, what))


def upright(image: Image.Image) -> Image.Image:
    """A decoded file turned as its EXIF orientation says (a phone's portrait photo stands up), as
    transformers' `load_image` does; an image without the tag is returned as it is."""
    if image.getexif().get(ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def checked(image: Image.Image, policy: MediaPolicy, what: str) -> Image.Image:
    """`image` fully loaded, if its pixel count is within the policy."""
    w, h = image.size
    if w < 1 or h < 1 or w * h > policy.max_pixels:
        raise ImageError(f"{what} is {w}x{h} pixels; at most {policy.max_pixels} pixels are accepted")
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{what} could not be decoded ({e})") from None
    return image


def _data_url(url: str, policy: MediaPolicy, what: str) -> Image.Image:
    """RFC 2397 as clients write it: the `;base64` flag in any case, among other parameters; base64 with
    line breaks or spaces (as `base64` wraps it), missing padding or the URL-safe alphabet; without the
    flag, percent-encoded bytes."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(f"{what}: a data URL must be data:<type>;base64,<data>")
    if not any(p.strip().lower() == "base64" for p in head.split(";")[1:]):
        return decode_image(urllib.parse.unquote_to_bytes(payload), policy, what)
    text = "".join(urllib.parse.unquote(payload).split()).rstrip("=")
    altchars = b"-_" if "-" in text or "_" in text else None  # the URL-safe alphabet
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what}: the data URL's base64 is malformed") from None
    return decode_image(data, policy, what)


def _check_host(host: str, port: int | None, policy: MediaPolicy, what: str) -> None:
    if policy.allowed_domains and not any(
        host == d or host.endswith("." + d) for d in policy.allowed_domains
    ):
        raise ImageError(f"{what}: host {host!r} is not in the allowed media domains")
    if policy.allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ImageError(f"{what}: cannot resolve {host!r} ({e.strerror or e})") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global:
            raise ImageError(f"{what}: {host!r} is a loopback or private address; such URLs are refused")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead past the address checks
        return None


def _http_url(url: str, policy: MediaPolicy, what: str) -> Image.Image:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ImageError(f"{what}: the URL has no host")
    _check_host(parts.hostname, parts.port, policy, what)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(
            urllib.request.Request(url, headers={"User-Agent": "jaxrs"}), timeout=policy.timeout
        ) as r:
            data = r.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{what}: fetching {url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{what}: {url} is unreachable ({reason})") from None
    return decode_image(data, policy, what)


def _file_url(url: str, policy: MediaPolicy, what: str) -> Image.Image:
    root = policy.allowed_local_media_path
    if root is None:
        raise ImageError(f"{what}: file:// URLs need --allowed-local-media-path")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise ImageError(f"{what}: {path} is outside the allowed local media path")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{what}: cannot read {path} ({e.strerror})") from None
    return decode_image(data, policy, what)


def load_image(source: object, policy: MediaPolicy, what: str = "the image") -> Image.Image:
    """A PIL image from a URL string (data/http/https/file), bytes, or a PIL image."""
    if isinstance(source, Image.Image):
        return checked(source, policy, what)
    if isinstance(source, bytes | bytearray):
        return decode_image(bytes(source), policy, what)
    if not isinstance(source, str):
        raise ImageError(f"{what} must be a URL, bytes or a PIL image, not {type(source).__name__}")
    scheme = source.split(":", 1)[0].lower()
    if scheme == "data":
        return _data_url(source, policy, what)
    if scheme in ("http", "https"):
        return _http_url(source, policy, what)
    if scheme == "file":
        return _file_url(source, policy, what)
    shown = source if len(source) <= 40 else source[:37] + "..."
    raise ImageError(f"{what}: {shown!r} is not a data, http(s) or file URL")
