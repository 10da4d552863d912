"""Images as clients send them: data URLs in their common spellings, every file format and mode Pillow
reads, and EXIF-rotated photos, decoded to the picture a viewer shows."""

from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from jaxrs.vision.image_ops import to_rgb
from jaxrs.vision.media import ImageError, MediaPolicy, load_image
from tests.vision_models import random_image

POLICY = MediaPolicy()


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return random_image(17, 30, seed=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "url",
    [
        lambda d: "data:image/png;base64," + b64(d),
        lambda d: "data:IMAGE/PNG;BASE64," + b64(d),  # case-insensitive type and flag
        lambda d: "data:image/png;name=x.png;base64," + b64(d),  # another parameter first
        lambda d: "data:image/png;base64," + base64.encodebytes(d).decode(),  # wrapped at 76 with \n
        lambda d: "data:image/png;base64,\r\n " + b64(d) + " \n",  # spaces and CRLF around it
        lambda d: "data:image/png;base64," + b64(d).rstrip("="),  # padding left off
        lambda d: "data:image/png;base64," + base64.urlsafe_b64encode(d).decode(),  # URL-safe alphabet
        lambda d: "data:image/png;base64," + urllib.parse.quote(b64(d), safe=""),  # percent-escaped
        lambda d: "data:image/png," + urllib.parse.quote_from_bytes(d),  # no ;base64: percent-encoded
        lambda d: "data:;base64," + b64(d),  # no media type
    ],
)
def test_data_url_spellings_decode_the_same_pixels(picture, url):
    data = encoded(picture)
    got = load_image(url(data), POLICY)
    np.testing.assert_array_equal(pixels(got), np.asarray(picture))


@pytest.mark.parametrize(
    "url", ["data:image/png;base64,@@@", "data:image/png;base64", "data:image/png;base64,A"]
)
def test_malformed_data_urls_are_named(url):
    with pytest.raises(ImageError, match="data URL"):
        load_image(url, POLICY)


@pytest.mark.parametrize(
    "fmt, mode, kw, exact",
    [
        ("PNG", "L", {}, True),
        ("PNG", "LA", {}, True),
        ("PNG", "RGBA", {}, True),
        ("PNG", "P", {}, True),
        ("PNG", "1", {}, True),
        ("PNG", "I;16", {}, True),
        ("GIF", "P", {}, True),
        ("BMP", "RGB", {}, True),
        ("TIFF", "RGB", {}, True),
        ("WEBP", "RGB", {"lossless": True}, True),
        ("WEBP", "RGBA", {"quality": 80}, False),
        ("JPEG", "RGB", {"quality": 90}, False),
        ("JPEG", "L", {}, False),
        ("JPEG", "CMYK", {}, False),
    ],
)
def test_formats_and_modes_decode_to_rgb(picture, fmt, mode, kw, exact):
    source = picture.convert(mode)
    got = load_image(encoded(source, fmt, **kw), POLICY)
    assert got.size == picture.size
    rgb = pixels(got)
    assert rgb.shape == (30, 17, 3)
    if exact:
        np.testing.assert_array_equal(rgb, pixels(source))


def test_animated_gif_gives_its_first_frame(picture):
    frames = [picture, random_image(17, 30, seed=4), random_image(17, 30, seed=5)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    got = load_image(data, POLICY)
    np.testing.assert_array_equal(pixels(got), pixels(Image.open(io.BytesIO(encoded(frames[0], "GIF")))))


@pytest.mark.parametrize(
    "orientation, turn",
    [
        (1, None),
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_exif_orientation_is_applied_to_files(picture, orientation, turn):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(picture, "PNG", exif=exif)  # PNG keeps the pixels exact; JPEG reads the same tag
    want = picture if turn is None else picture.transpose(turn)
    got = load_image(data, POLICY)
    assert got.size == want.size
    np.testing.assert_array_equal(pixels(got), np.asarray(want))
    jpeg = load_image(encoded(picture, "JPEG", exif=exif, quality=95), POLICY)
    assert jpeg.size == want.size


def test_a_pil_image_is_taken_as_given(picture):
    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.open(io.BytesIO(encoded(picture, "PNG", exif=exif)))
    assert load_image(image, POLICY).size == picture.size  # the caller's image is not turned


@pytest.mark.parametrize("size", [(1, 1), (17, 300), (2000, 30), (3000, 2), (2, 3000)])
def test_odd_sizes_decode(size):
    got = load_image(encoded(random_image(*size)), POLICY)
    assert got.size == size
