"""Chat templates rendered by jaxrs against transformers' apply_chat_template / render_jinja_template."""

from __future__ import annotations

import copy
from datetime import datetime

import jinja2
import pytest

from jaxrs.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from jaxrs.errors import JaxrsError
from tests.test_gguf_tokenizer import our_tokenizer, reference_tokenizer

CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "Hello!"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I'm SmolLM. 😀"},
        {"role": "user", "content": "Write code:\n\tdef f(): pass\n<b>&</b> 日本"},
        {"role": "assistant", "content": "  spaced  "},
    ],
    "system-multi-turn": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
}


@pytest.fixture(scope="module")
def ours(demo_gguf):
    return our_tokenizer(str(demo_gguf))


@pytest.fixture(scope="module")
def ref(demo_gguf):
    return reference_tokenizer(str(demo_gguf))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(ours, ref, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ref_ids = ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.encode(text) == list(ref_ids)


@pytest.mark.parametrize("name", ["multi-turn", "system-multi-turn"])
def test_continue_final_message_matches_transformers(ours, ref, name):
    """The final message left open for the model to continue (a prefilled answer), cut where
    transformers cuts it, whether the template keeps the message's spacing or strips it."""
    messages = [*CONVERSATIONS[name][:-1], {"role": "assistant", "content": "  The answer is "}]
    text = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("assistant\n  The answer is ")  # the template keeps the spacing
    with pytest.raises(JaxrsError, match="cannot both"):
        ours.apply_chat_template(messages, continue_final_message=True)
    with pytest.raises(JaxrsError, match="continue_final_message"):
        ours.apply_chat_template(
            [*messages[:-1], {"role": "assistant", "content": " "}],
            add_generation_prompt=False,
            continue_final_message=True,
        )


HAND_WRITTEN = """\
{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message.get('content') == 'STOP' %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ message['role'] }}: {{ message['content'] | default('(none)') }}
    {% if message.tool_calls is defined %}calls={{ message.tool_calls | tojson }}{% endif %}
    {% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}
{% endfor %}
{% if tools %}tools={{ tools | tojson(indent=2) }}
{% endif %}
date={{ strftime_now('%Y-%m') }} extra={{ extra_flag | default(false) }} {{ dict(a=1) | tojson }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}{{ eos_token if not add_generation_prompt }}"""

HAND_CONVERSATION = [
    {"role": "system", "content": "skipped by continue"},
    {"role": "user", "content": "<b>quoted \"html\" & 'json'</b> 日本 😀"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": "é<>"}}}],
    },
    {"role": "assistant", "content": "answer", "reasoning": "because"},
    {"role": "user", "content": "STOP"},
    {"role": "user", "content": "never rendered"},
]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "ünïcode <tool>", "parameters": {}}}]


def _reference_render(template, messages, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hand_written_template_matches_transformers(ours, ref, add_generation_prompt):
    hand = copy.copy(ours)
    hand.chat_template = HAND_WRITTEN
    for tools, extra in ((None, {}), (TOOLS, {"extra_flag": True})):
        text = hand.apply_chat_template(HAND_CONVERSATION, add_generation_prompt, tools=tools, **extra)
        assert text == ref.apply_chat_template(
            HAND_CONVERSATION, chat_template=HAND_WRITTEN, add_generation_prompt=add_generation_prompt,
            tools=tools, tokenize=False, **extra,
        )  # fmt: skip
    # the features at work: tojson unescaped, loop controls, None content dropped, reasoning aliased
    assert '"é<>"' in text and "ünïcode <tool>" in text and '[\n  {\n    "type"' in text
    assert "skipped" not in text and "never rendered" not in text and "[3] assistant" in text
    assert "[2] assistant: (none)" in text and "<think>because</think>" in text
    assert f"date={datetime.now():%Y-%m}" in text and "extra=True" in text and '{"a": 1}' in text
    assert text.startswith("<|im_start|>") and text.endswith(
        "ASSISTANT:" if add_generation_prompt else "<|im_end|>"
    )


def test_raise_exception_becomes_jaxrs_error():
    messages = [{"role": "robot", "content": "beep"}]
    with pytest.raises(JaxrsError, match="unknown role robot"):
        render_chat_template(
            HAND_WRITTEN, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role robot"):  # same message upstream
        _reference_render(
            HAND_WRITTEN, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )


def test_template_errors_are_jaxrs_errors():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        compile_chat_template("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template("x", [], add_generation_prompt=True, bos_token=None, eos_token=None)
    with pytest.raises(ChatTemplateError, match="failed"):  # a template error at render time
        render_chat_template(
            "{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}],
            add_generation_prompt=True, bos_token=None, eos_token=None,
        )  # fmt: skip
    with pytest.raises(ChatTemplateError, match="SecurityError"):  # the sandbox still applies
        render_chat_template(
            "{{ ''.__class__.__mro__ }}", [{"role": "user", "content": "x"}],
            add_generation_prompt=True, bos_token=None, eos_token=None,
        )  # fmt: skip


def test_compiled_once():
    assert compile_chat_template(HAND_WRITTEN) is compile_chat_template(HAND_WRITTEN)


def test_no_chat_template(ours):
    from jaxrs.tokenizer import Tokenizer

    bare = Tokenizer(backend=ours.backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)
    with pytest.raises(JaxrsError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
