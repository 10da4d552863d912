"""Chat messages to prompt text: content parts joined for string templates, handed back as typed parts to
templates that read them (LLaVA's published template renders a plain string as nothing), images as the
model's marker in the place the template gives them."""

from __future__ import annotations

import pytest

from jaxrs.tokenizer import Tokenizer
from jaxrs.vision.chat import chat_inputs, split_images, template_contents
from jaxrs.vision.media import MediaPolicy
from tests.conftest import save_tiny_tokenizer

STRINGS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TYPED = (  # llava-hf's: images first, then the text parts; a plain string renders as nothing
    "{% for m in messages %}{{ m['role'] }}: "
    "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }} {% endfor %}"
    "\n{% endfor %}"
)
BOTH = (  # reads either
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path, 64)
    return Tokenizer.from_hf_folder(path)


def render(tokenizer, template, messages, marker=None):
    tokenizer.chat_template = template
    texts, _ = split_images(messages, marker)
    return tokenizer.apply_chat_template(
        template_contents(tokenizer, texts, marker), add_generation_prompt=False
    )


TEXT_PARTS = [{"role": "user", "content": [{"type": "text", "text": "w5"}, {"type": "text", "text": "w6"}]}]
IMAGE_AFTER = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "w5"}, {"type": "image_url", "image_url": {"url": "x"}}],
    }
]


def test_text_parts_reach_a_string_template_as_text(tokenizer):
    assert render(tokenizer, STRINGS, TEXT_PARTS) == "user: w5\nw6\n"
    assert render(tokenizer, STRINGS, [{"role": "user", "content": "w5"}]) == "user: w5\n"
    assert render(tokenizer, STRINGS, IMAGE_AFTER, "<image>") == "user: w5\n<image>\n"


def test_a_typed_template_gets_parts_back(tokenizer):
    assert render(tokenizer, TYPED, [{"role": "system", "content": "w4"}]) == "system: w4 "
    assert render(tokenizer, TYPED, TEXT_PARTS) == "user: w5 w6 "  # each text part apart, as transformers
    assert render(tokenizer, TYPED, IMAGE_AFTER, "<image>") == "user: <image>\nw5 "
    tool_call = {"role": "assistant", "content": None, "tool_calls": []}
    assert template_contents(tokenizer, [tool_call], "<image>") == [tool_call]


def test_a_template_of_either_form_gets_parts_for_images_and_strings_without(tokenizer):
    assert render(tokenizer, BOTH, IMAGE_AFTER, "<image>") == "user: w5<image>"
    assert render(tokenizer, BOTH, TEXT_PARTS) == "user: w5\nw6"  # a text-only model: strings


def test_chat_inputs_of_a_text_model(tokenizer):
    tokenizer.chat_template = STRINGS
    ids, images = chat_inputs(tokenizer, None, TEXT_PARTS, MediaPolicy(), add_generation_prompt=False)
    assert images is None and tokenizer.decode(ids).split() == ["<unk>", "w5", "w6"]


def test_typed_text_parts_render_as_transformers_renders_them(tokenizer):
    """Several text parts (and images between) reach a template that reads parts one by one, as
    transformers' apply_chat_template hands them over; a tool result's parts stay one text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    W6 = {"type": "text", "text": "w6"}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "w5"},
                {"type": "image"},
                W6,
                {"type": "text", "text": "w9"},
            ],
        },
        {"role": "tool", "content": [{"type": "text", "text": "w7"}, {"type": "text", "text": "w8"}]},
    ]
    sources = [{"type": "image_url", "image_url": {"url": "x"}}]
    ours = [
        {**messages[0], "content": [messages[0]["content"][0], *sources, *messages[0]["content"][2:]]},
        messages[1],
    ]
    for template in (BOTH, TYPED):
        reference = render_jinja_template([messages[:1]], chat_template=template)[0][0]
        assert render(tokenizer, template, ours[:1], "<image>") == reference
    texts, found = split_images(ours, "<image>")
    assert found == ["x"] and texts[1]["content"] == "w7\nw8"
