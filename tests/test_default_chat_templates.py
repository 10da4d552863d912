"""Built-in chat formats: Gemma's turns, and when a GGUF without a template gets one."""

from __future__ import annotations

import logging

import pytest

from jaxrs.chat_template import ChatTemplateError, render_chat_template
from jaxrs.default_chat_templates import default_chat_format
from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf

GEMMA = default_chat_format("gemma3")


def render(messages, add_generation_prompt=True) -> str:
    return render_chat_template(
        GEMMA.template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<bos>",
        eos_token="<eos>",
    )


def test_gemma_families_share_the_turn_format():
    assert default_chat_format("gemma") is default_chat_format("gemma2") is GEMMA
    assert GEMMA.end_of_turn == "<end_of_turn>"
    assert default_chat_format("llama") is None and default_chat_format(None) is None


def test_gemma_turns():
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " What is the capital of France?\n"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    assert render(messages) == (
        "<bos><start_of_turn>user\nBe brief. \n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render(messages[1:2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
    )


def test_gemma_turns_must_alternate():
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render([{"role": "assistant", "content": "a"}])


def spm_metadata(**extra) -> dict:
    """A tiny SentencePiece vocabulary with Gemma's control tokens."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "▁", "a", "b", "▁a"]
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * 6 + [1] * 4,
        "tokenizer.ggml.scores": [0.0] * 6 + [-1.0, -2.0, -3.0, -0.5],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        **extra,
    }


@pytest.mark.parametrize(
    "names",
    [{"general.finetune": "it"}, {"general.name": "gemma-2-9b-it"}, {"general.name": "Gemma 7B Instruct"}],
)
def test_instruction_tuned_file_without_template_gets_gemma_turns(names, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxrs"):
        tok = tokenizer_from_gguf(spm_metadata(**names), "x.gguf")
    assert tok.chat_template == GEMMA.template
    assert "x.gguf: no chat template in the file; using the built-in gemma turn format" in caplog.text
    assert tok.eos_token_ids == [1, 5] and tok.eos_token == "<eos>"
    text = tok.apply_chat_template([{"role": "user", "content": "a"}])
    assert text == "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(text)
    assert ids[:2] == [2, 4] and ids.count(2) == 1 and ids.count(5) == 1


@pytest.mark.parametrize(
    "names", [{}, {"general.name": "Gemma 3 270m"}, {"general.name": "gemma-2b-italian"}]
)
def test_base_model_without_template_completes_text(names, caplog):
    with caplog.at_level(logging.INFO, logger="jaxrs"):
        tok = tokenizer_from_gguf(spm_metadata(**names), "x.gguf")
    assert tok.chat_template is None and "no built-in gemma turn format for a base model" in caplog.text
    assert tok.eos_token_ids == [1, 5]  # a stray end of turn still ends generation


def test_a_template_in_the_file_wins():
    tok = tokenizer_from_gguf(
        spm_metadata(**{"general.finetune": "it", "tokenizer.chat_template": "{{ messages[0]['content'] }}"}),
        "x.gguf",
    )
    assert tok.chat_template == "{{ messages[0]['content'] }}" and tok.eos_token_ids == [1, 5]
    llama = tokenizer_from_gguf(spm_metadata(**{"general.architecture": "llama"}), "x.gguf")
    assert llama.chat_template is None and llama.eos_token_ids == [1]
