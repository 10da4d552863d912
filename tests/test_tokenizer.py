"""Tokenizer: streaming detokenization, loading a Hugging Face tokenizer folder, BOS/EOS policy."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import processors

from jaxrs.errors import ModelLoadError
from jaxrs.loading.gguf_reader import open_gguf, read_metadata
from jaxrs.loading.gguf_tokenizer import tokenizer_from_gguf
from jaxrs.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.test_gguf_tokenizer import our_tokenizer, reference_tokenizer, write_spm_gguf

TEXTS = [
    "Hello, world! Streaming text, one token at a time.",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 🫠🦩",
    "日本語のテキスト、中文字符，한국어 — ümlauts and ß",
    "code:\n    def f(x):\n\treturn x  # ok\n\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛑 ≈ 3.14159, Ꙭ, 🀄",
]


@pytest.fixture(scope="module")
def tok(demo_gguf) -> Tokenizer:
    return our_tokenizer(str(demo_gguf))


@pytest.fixture(scope="module")
def ref(demo_gguf):
    return reference_tokenizer(str(demo_gguf))


def _stream(tok: Tokenizer, ids: list[int], prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_stream_valid_text(tok, text):
    ids = tok.encode(text)
    # the test means something only if some characters are split over byte tokens
    if any(ord(c) > 0x2FFF for c in text):
        assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    prompt = tok.encode("<|im_start|>user\nSay it<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(_stream(tok, ids, prompt_ids=prompt)) == text


def test_stream_random_ids(tok):
    """Arbitrary ids (special tokens and lone UTF-8 fragments included): the pushes plus a final flush
    equal the full decode, with and without special tokens."""
    rng = random.Random(0)
    for trial in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        if trial % 2:
            ids += tok.encode(rng.choice(TEXTS))[:20] + [rng.randrange(17)]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            pieces = [detok.push(i) for i in ids]
            pieces.append(detok.flush())
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert detok.flush() == ""


def test_stream_sentencepiece_context(tmp_path):
    """A SentencePiece decoder drops the leading space of what it decodes; the prompt's last ids give the
    context that keeps the space between prompt and continuation, and byte-fallback CJK comes out whole."""
    path = write_spm_gguf(tmp_path / "spm.gguf")
    spm = tokenizer_from_gguf(read_metadata(open_gguf(path)), path)
    full = spm.encode("the quick brown fox jumps 日本 😀 over")
    for k in (1, 3, 5, 9):
        prompt, generated = full[:k], full[k:]
        expected = spm.decode(full, skip_special_tokens=True)[
            len(spm.decode(prompt, skip_special_tokens=True)) :
        ]
        assert expected.startswith(" ") == (k > 1)  # after BOS alone the text starts: no space
        pieces = _stream(spm, generated, prompt_ids=prompt)
        assert "".join(pieces) == expected and not any("\ufffd" in p for p in pieces)
    assert "".join(_stream(spm, full)) == spm.decode(full, skip_special_tokens=True)


def test_stream_special_tokens(tok):
    ids = tok.encode("Done.<|im_end|>")
    assert ids[-1] == 2
    assert "".join(_stream(tok, ids)) == "Done."
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == "Done.<|im_end|>"


def test_encode_bos_eos_policy(tok):
    t = Tokenizer(backend=tok.backend, bos_token_id=1, eos_token_ids=[2, 0, 2], add_bos=True, add_eos=True)
    body = tok.encode("hi there", add_special_tokens=False)
    assert t.eos_token_ids == [2, 0] and t.eos_token == "<|im_end|>" and t.bos_token == "<|im_start|>"
    assert t.encode("hi there") == [1, *body, 2]
    assert t.encode("hi there", add_special_tokens=False) == body
    assert t.encode("<|im_start|>hi there<|im_end|>") == [1, *body, 2]  # never doubled
    assert t.encode("") == [1, 2]
    assert t.count_tokens("hi there") == len(body) + 2


# -- Hugging Face folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_folder(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tok")
    ref.save_pretrained(folder)
    return folder


def test_from_hf_folder_matches_original(tok, ref, saved_folder):
    loaded = Tokenizer.from_hf_folder(saved_folder)
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.pad_token_id) == (1, [2], 2)
    assert not loaded.add_bos and not loaded.add_eos  # nothing in the config: inferred from the backend
    assert loaded.chat_template == tok.chat_template
    assert loaded.vocab_size == tok.vocab_size
    for text in [*TEXTS, "", "  x  ", "<|im_start|>user\nhi<|im_end|>\n", "digits 12345 ½"]:
        ids = loaded.encode(text)
        assert ids == ref.encode(text)
        assert loaded.decode(ids) == tok.decode(ids)
    conv = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(conv) == tok.apply_chat_template(conv)


def _copy_folder(src, dst, *, config=None, generation=None, backend=None, jinja=True):
    dst.mkdir()
    tok_json = (src / "tokenizer.json").read_text()
    if backend is not None:
        tok_json = backend.to_str()
    (dst / "tokenizer.json").write_text(tok_json)
    base = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    if jinja:
        (dst / "chat_template.jinja").write_text((src / "chat_template.jinja").read_text())
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation))
    return dst


def test_from_hf_folder_config_variants(saved_folder, tmp_path):
    # tokens as AddedToken dicts, explicit add_bos_token, a list of named templates, generation eos ids
    folder = _copy_folder(
        saved_folder,
        tmp_path / "a",
        config={
            "bos_token": {"content": "<|im_start|>", "special": True, "__type": "AddedToken"},
            "eos_token": {"content": "<|im_end|>"},
            "add_bos_token": True,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        },
        generation={"eos_token_id": [2, 0], "bos_token_id": 1},
        jinja=False,
    )
    loaded = Tokenizer.from_hf_folder(folder)
    assert loaded.add_bos and loaded.eos_token_ids == [2, 0] and loaded.chat_template == "D"
    assert loaded.encode("hi")[0] == 1 and loaded.encode("<|im_start|>hi").count(1) == 1

    # no add_bos_token, but the backend's post-processor adds BOS: detected, and not doubled by us
    backend = Tokenizer.from_hf_folder(saved_folder).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    folder = _copy_folder(saved_folder, tmp_path / "b", backend=backend)
    loaded = Tokenizer.from_hf_folder(folder)
    assert loaded.add_bos
    assert loaded.encode("hi") == [1, *loaded.encode("hi", add_special_tokens=False)]
    assert loaded.encode("hi", add_special_tokens=False)[0] != 1


def test_from_hf_folder_errors(saved_folder, tmp_path):
    with pytest.raises(ModelLoadError) as e:
        Tokenizer.from_hf_folder(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "missing tokenizer.json" in str(e.value)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match="cannot parse tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    folder = _copy_folder(saved_folder, tmp_path / "c")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: cannot read JSON"):
        Tokenizer.from_hf_folder(folder)
