"""Images through the OpenAI-compatible server with the official openai client, and through `LLM.chat`:
data URLs, http(s) and file URLs under the media policy, streaming, and each bad input a 400 that leaves
the engine clean (no request left, no KV block held)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import threading

import openai
import pytest
from litestar.testing import TestClient
from PIL import Image

from jaxrs import LLM, SamplingParams
from jaxrs.vision.media import ImageError
from server import create_app
from tests.vision_models import random_image, tiny_llava

GREEDY = dict(temperature=0, max_tokens=6)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(url: str, text: str = "w5 w6") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_llava(path)
    return path


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32", block_size=8, kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def picture():
    return random_image(45, 31, seed=5)


@pytest.fixture(scope="module")
def reference(llm, picture):
    """The greedy answer through `LLM.chat` with a PIL image, before a server owns the engine."""
    messages = [
        {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "w5 w6"}]}
    ]
    return llm.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)[0]


@pytest.fixture
def oai(llm, reference):
    with TestClient(create_app(llm, served_model_name="x")) as client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    assert not llm.engine.has_unfinished()
    assert llm.engine.blocks.num_used == 0


def test_chat_takes_urls_and_pil_images_alike(llm, picture, reference, tmp_path):
    assert reference.token_ids and len(reference.prompt_token_ids) > 16
    same = llm.chat(ask(data_url(png(picture))), SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert same.token_ids == reference.token_ids
    (tmp_path / "p.png").write_bytes(png(picture))
    llm.media = dataclasses.replace(llm.media, allowed_local_media_path=tmp_path)
    try:
        local = llm.chat(ask((tmp_path / "p.png").as_uri()), SamplingParams(**GREEDY), use_tqdm=False)[0]
    finally:
        llm.media = dataclasses.replace(llm.media, allowed_local_media_path=None)
    assert local.token_ids == reference.token_ids
    with pytest.raises(ImageError, match="allowed-local-media-path"):
        llm.chat(ask((tmp_path / "p.png").as_uri()), SamplingParams(**GREEDY), use_tqdm=False)


def test_data_url_and_streaming_through_the_server(oai, picture, reference):
    messages = ask(data_url(png(picture)))
    out = oai.chat.completions.create(model="x", messages=messages, **GREEDY)
    assert out.choices[0].message.content == reference.text
    assert out.usage.prompt_tokens == len(reference.prompt_token_ids)
    stream = oai.chat.completions.create(model="x", messages=messages, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference.text


def test_http_url_from_an_allowed_private_host(llm, oai, picture, reference):
    body = png(picture)

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/p.png"
    try:
        with pytest.raises(openai.BadRequestError, match="loopback or private"):
            oai.chat.completions.create(model="x", messages=ask(url), **GREEDY)
        llm.media = dataclasses.replace(llm.media, allow_private=True)
        out = oai.chat.completions.create(model="x", messages=ask(url), **GREEDY)
        assert out.choices[0].message.content == reference.text
    finally:
        llm.media = dataclasses.replace(llm.media, allow_private=False)
        httpd.shutdown()


def bomb() -> bytes:
    """A small PNG whose header claims 6000 x 6000 pixels."""
    return png(Image.new("1", (6000, 6000)))


@pytest.mark.parametrize(
    "content, message",
    [
        (data_url(b"not an image at all"), "not an image"),
        (data_url(bomb()), "pixels"),
        ("data:image/png;base64,@@@", "base64"),
        ("http://host.invalid/p.png", "cannot resolve"),
        ("http://127.0.0.1:9/p.png", "loopback or private"),
        ("file:///etc/passwd", "allowed-local-media-path"),
        ("ftp://example.com/p.png", r"'ftp://example.com/p.png' is not a data, http\(s\) or file URL"),
        (
            base64.b64encode(b"\x89PNG" * 40).decode(),
            r"'iVBOR.*\.\.\.' is not a data, http\(s\) or file URL",
        ),
    ],
)
def test_bad_images_are_400s(oai, content, message):
    with pytest.raises(openai.BadRequestError, match=message):
        oai.chat.completions.create(model="x", messages=ask(content), **GREEDY)


def test_a_bad_image_is_named_by_its_place_in_the_messages(oai, picture):
    """Across turns, the message names the part that holds the bad image, not its rank among images."""
    good = {"type": "image_url", "image_url": {"url": data_url(png(picture))}}
    bad = {"type": "image_url", "image_url": {"url": data_url(b"not an image")}}
    messages = [
        {"role": "user", "content": [good, {"type": "text", "text": "w5"}]},
        {"role": "assistant", "content": "w6"},
        {"role": "user", "content": [{"type": "text", "text": "w7"}, bad]},
    ]
    with pytest.raises(openai.BadRequestError, match=r"messages\[2\]\.content\[1\] is not an image") as e:
        oai.chat.completions.create(model="x", messages=messages, **GREEDY)
    assert e.value.body["param"] == "messages[2].content[1]" and e.value.body["code"] == "invalid_image"


def test_detail_and_part_types_are_checked_as_openai_checks_them(oai, picture):
    """`detail` "auto", "low" or "high" is served (the processor decides the size); another is a 400
    naming it, and a part of another type a 400 naming the types a vision model takes."""
    url = data_url(png(picture))
    for detail in ("auto", "low", "high"):
        part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        out = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": [part]}], **GREEDY)
        assert out.choices[0].message.content
    bad = {"type": "image_url", "image_url": {"url": url, "detail": "ultra"}}
    with pytest.raises(openai.BadRequestError, match="must be 'auto', 'low' or 'high', not 'ultra'") as e:
        oai.chat.completions.create(model="x", messages=[{"role": "user", "content": [bad]}], **GREEDY)
    assert e.value.body["param"] == "messages[0].content[0].image_url.detail"
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match="only 'text' and 'image_url' parts are accepted"):
        oai.chat.completions.create(model="x", messages=[{"role": "user", "content": [audio]}], **GREEDY)


def test_too_large_and_too_many(llm, oai, picture):
    noise = png(random_image(300, 300, seed=9))
    llm.media = dataclasses.replace(llm.media, max_bytes=len(noise) - 1, limit_images=2)
    try:
        with pytest.raises(openai.BadRequestError, match="limit is"):
            oai.chat.completions.create(model="x", messages=ask(data_url(noise)), **GREEDY)
        three = [{"type": "image_url", "image_url": {"url": data_url(png(picture))}}] * 3
        with pytest.raises(openai.BadRequestError, match="3 images in one prompt; the limit is 2"):
            oai.chat.completions.create(model="x", messages=[{"role": "user", "content": three}], **GREEDY)
        out = oai.chat.completions.create(model="x", messages=ask(data_url(png(picture))), **GREEDY)
        assert out.choices[0].finish_reason in ("stop", "length")  # a good request still runs
    finally:
        llm.media = dataclasses.replace(llm.media, max_bytes=20 * 2**20, limit_images=8)


def test_text_only_model_refuses_images():
    from jaxrs.vision.chat import split_images

    with pytest.raises(ImageError, match="text-only"):
        split_images(ask("data:,"), None)


def test_interactive_chat_image_command(llm, picture, reference, tmp_path, monkeypatch, capsys):
    from jaxrs.cli import _chat

    (tmp_path / "p.png").write_bytes(png(picture))
    lines = iter([f"/image {tmp_path / 'missing.png'}", f"/image {tmp_path / 'p.png'}", "w5 w6", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert _chat(llm, SamplingParams(**GREEDY), []) == 0
    out = capsys.readouterr()
    assert reference.text in out.out
    assert "missing.png" in out.err and "[image" in out.err


# llava-hf/llava-1.5-7b-hf's published template: it reads typed parts and renders a plain string as nothing
HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def typed_conversations(picture):
    other = random_image(20, 50, seed=8)
    image, text = {"type": "image", "image": picture}, {"type": "text", "text": "w5 w6"}
    return [
        [{"role": "user", "content": [image, text]}],
        [{"role": "user", "content": [text, image]}],
        [{"role": "user", "content": [image, {"type": "image", "image": other}, text]}],
        [
            {"role": "system", "content": [{"type": "text", "text": "w9"}]},
            {"role": "user", "content": [image, text]},
            {"role": "assistant", "content": [{"type": "text", "text": "w7 w8"}]},
            {"role": "user", "content": [{"type": "text", "text": "w10"}, {"type": "image", "image": other}]},
        ],
    ]


@pytest.fixture
def typed_template(llm):
    plain, llm.tokenizer.chat_template = llm.tokenizer.chat_template, HF_TEMPLATE
    yield
    llm.tokenizer.chat_template = plain


def as_urls(messages):
    def part(p):
        if p.get("type") != "image":
            return p
        return {"type": "image_url", "image_url": {"url": data_url(png(p["image"]))}}

    return [
        {**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
        for m in messages
    ]


def test_a_template_of_typed_parts_gets_them_as_transformers_renders(folder, llm, picture, typed_template):
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(folder)
    hf.chat_template = HF_TEMPLATE
    ours = []
    for messages in typed_conversations(picture):
        ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ours.append(llm.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)[0])
        assert ours[-1].prompt_token_ids == ref["input_ids"][0]
    # a plain string (which the template alone would render as nothing) is read as one text part
    plain = [{"role": "system", "content": "w9"}, *typed_conversations(picture)[0]]
    assert llm.chat(plain, SamplingParams(**GREEDY), use_tqdm=False)[0].prompt_token_ids[:2] == [9, 0]
    with TestClient(create_app(llm, served_model_name="x")) as client:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
        for messages, want in zip(typed_conversations(picture), ours, strict=True):
            out = oai.chat.completions.create(model="x", messages=as_urls(messages), **GREEDY)
            assert out.usage.prompt_tokens == len(want.prompt_token_ids)
            assert out.choices[0].message.content == want.text
