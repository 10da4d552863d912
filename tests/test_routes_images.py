"""/v1/images/generations through the official openai client, on a tiny random schnell pipeline saved to
a temporary folder, next to the demo chat model: PNGs of the asked size (b64_json and url), the same
seed the same image, 400s for bad input, chat answered while an image is generating."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import openai
import pytest
from litestar.testing import TestClient
from PIL import Image

from jaxrs import LLM
from jaxrs.images import ImageLimits, ImageModel
from server import create_app
from tests.flux_tiny import save_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    folder = save_pipeline(tmp_path_factory.mktemp("flux"), dev=False)
    return ImageModel(folder, limits=ImageLimits(min_side=32, max_side=128, max_images=2))


@pytest.fixture(scope="module")
def llm(demo_gguf):
    return LLM(str(demo_gguf), kv_cache_mb=16, max_num_seqs=4, max_model_len=256, max_decode_steps=4)


@pytest.fixture(scope="module")
def client(llm, image_model, tmp_path_factory):
    app = create_app(llm, image_model=image_model, image_output_dir=tmp_path_factory.mktemp("out"))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def decode(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


def test_b64_json_url_and_seed(oai, client):
    one = oai.images.generate(
        prompt="a red cat", size="64x32", n=2, response_format="b64_json", extra_body={"seed": 3}
    )
    images = [decode(d.b64_json) for d in one.data]
    assert [im.size for im in images] == [(64, 32), (64, 32)]
    two = oai.images.generate(prompt="a red cat", size="64x32", n=2, extra_body={"seed": 3})  # url
    fetched = client.get(two.data[0].url.removeprefix("http://testserver"))
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(fetched.content))), np.asarray(images[0]))
    assert client.get("/v1/images/files/../../etc/passwd").status_code == 404


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"size": "48x40"}, "size"),
        ({"size": "256x256"}, "size"),
        ({"n": 3}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"response_format": "png"}, "response_format"),
    ],
)
def test_bad_input_is_400(oai, kwargs, param):
    args = {"prompt": "a dog", "size": "32x32", **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(**args)
    assert e.value.body["param"] == param


def test_chat_is_served_while_an_image_generates(oai, image_model, monkeypatch):
    started, chat_done = threading.Event(), threading.Event()
    denoise = image_model.pipeline.denoise

    def held(*args, **kwargs):
        started.set()
        assert chat_done.wait(120)
        return denoise(*args, **kwargs)

    monkeypatch.setattr(image_model.pipeline, "denoise", held)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("image", oai.images.generate(prompt="a cat", size="64x32", n=2))
    )
    worker.start()
    assert started.wait(60)
    chat = oai.chat.completions.create(
        model=oai.models.list().data[0].id,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
    )
    chat_done.set()
    worker.join(120)
    assert chat.choices[0].message.content
    assert "image" in result and result["image"].data[0].url
