"""The tokenizer rebuilt from GGUF metadata against transformers' own GGUF tokenizer loading.

Real file: SmolLM2 (byte-level BPE, `tokenizer.ggml.pre = "smollm"`). Synthetic files (written here with
gguf.GGUFWriter): a SentencePiece vocabulary with scores and no merges, and tiny byte-level ones for the
pre-tokenizer rules.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from pathlib import Path

import gguf
import pytest

from jaxrs.errors import ModelLoadError
from jaxrs.loading.gguf_reader import open_gguf, read_metadata
from jaxrs.loading.gguf_tokenizer import bytes_to_unicode, merges_from_scores, tokenizer_from_gguf
from jaxrs.tokenizer import Tokenizer

# -- shared loaders (imported by test_tokenizer.py and test_chat_template.py: each loads once per session)


@functools.lru_cache(maxsize=4)
def our_tokenizer(path: str) -> Tokenizer:
    return tokenizer_from_gguf(read_metadata(open_gguf(path)), path)


@functools.lru_cache(maxsize=4)
def reference_tokenizer(path: str):
    """transformers' tokenizer for a GGUF file (AutoTokenizer with gguf_file)."""
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def ours(demo_gguf) -> Tokenizer:
    return our_tokenizer(str(demo_gguf))


@pytest.fixture(scope="module")
def ref(demo_gguf):
    return reference_tokenizer(str(demo_gguf))


# Strings without digits: ids and text must equal transformers'.
TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "",
    " ",
    "   ",
    "\n",
    "  leading and trailing spaces  ",
    "a  b   c    d\t\te\n\n\nf \n g",
    "tabs\tand\nnewlines\r\n  and CRLF\r\n",
    "I'm sure they'll say we'd've DONE it, WE'LL see",
    "café naïve résumé Ångström façade Zürich",
    "日本語のテキスト、中文字符，한국어",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 ",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y <|im_start|> <|endoftext|>",
    "<|im_start|",
    "Ġ and Ċ are byte-level spellings, not text",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_smollm2_matches_transformers(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


NUMBERS = ["in 2024 we sold 1,234,567 units", "pi = 3.14159265", "x1y22z333 0x7fff", "²³ ½ ٣٤٥ 12"]


@pytest.mark.parametrize("text", NUMBERS)
def test_smollm2_digits_are_single_tokens(ours, text):
    """llama.cpp's `smollm` rule (and SmolLM's tokenizer.json) split every digit off; transformers has no
    such rule for GGUF files (it tokenizes " ½" as one piece), so here we check the rule itself."""
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    for token_id in ids:
        piece = ours.decode([token_id])
        numeric = [c for c in piece if unicodedata.category(c).startswith("N")]
        assert not numeric or piece == numeric[0], (text, piece)
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("ab 1234 c")]
    assert pieces == ["ab", "Ġ", "1", "2", "3", "4", "Ġc"]


def test_smollm2_special_tokens(ours, ref):
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (1, [2], 2)
    assert (
        (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token) == ("<|im_start|>", "<|im_end|>")
    )
    assert not ours.add_bos and not ours.add_eos
    assert ours.vocab_size == len(ref) == 49152
    assert ours.special_ids == set(range(17))
    assert ours.encode("<|im_start|>") == [1]
    assert ours.chat_template == ref.chat_template
    for i in (0, 1, 2, 17, 100, 1000, 49151):
        assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
        assert ours.token_to_id(ours.id_to_token(i)) == i


def test_byte_alphabet_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


# -- pre-tokenizer rules on a tiny byte-level vocabulary -----------------------------------------------


def _byte_level_metadata(pre: str | None, **extra) -> dict:
    alphabet = sorted(set(bytes_to_unicode().values()))
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", *alphabet],
        "tokenizer.ggml.token_type": [3] + [1] * len(alphabet),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 0,
        **extra,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


SPLIT_SAMPLES = ["Hello world 12345 it's DON'T\n\n  x", "  indented\tcode();\r\n", "über 日本 ½ 😀 a1b"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o"])
def test_regex_pre_tokenizers_match_transformers(pre):
    """Split regexes against transformers' table for the same names (its set_split_regex)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    ours = tokenizer_from_gguf(_byte_level_metadata(pre), "t.gguf")
    ref = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    for text in SPLIT_SAMPLES:
        assert _pieces(ours, text) == [p for p, _ in ref.pre_tokenize_str(text)]


def test_pre_tokenizer_rules_by_name(caplog):
    def pieces(pre, text):
        return _pieces(tokenizer_from_gguf(_byte_level_metadata(pre), "t.gguf"), text)

    assert pieces("gpt-2", "ab 12345") == ["ab", "Ġ12345"]
    assert pieces(None, "ab 12345") == ["ab", "Ġ12345"]
    assert pieces("llama3", "ab 12345") == ["ab", "Ġ", "123", "45"]
    assert pieces("qwen2", "ab 12345") == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("starcoder", "ab 12") == ["ab", "Ġ", "1", "2"]
    assert pieces("deepseek-coder", "ab 12\nx") == ["ab", "Ġ", "1", "2", "Ċ", "x"]
    assert pieces("deepseek-llm", "ab 12\nx") == ["ab", "Ġ", "12", "Ċ", "x"]
    with caplog.at_level(logging.WARNING, logger="jaxrs"):
        assert pieces("no-such-pre", "ab 12345") == ["ab", "Ġ12345"]
    assert "unknown pre-tokenizer 'no-such-pre'" in caplog.text


def test_byte_level_flags():
    smol = tokenizer_from_gguf(_byte_level_metadata("smollm"), "t.gguf")
    assert not smol.add_bos and smol.eos_token_ids == [0]
    llama3 = tokenizer_from_gguf(
        _byte_level_metadata("llama-bpe", **{"tokenizer.ggml.bos_token_id": 0}), "t.gguf"
    )
    assert llama3.add_bos  # llama.cpp's default for this pre-tokenizer when the flag is absent
    assert llama3.encode("hi") == [0, *llama3.encode("hi", add_special_tokens=False)]
    assert llama3.encode("<|endoftext|>hi").count(0) == 1  # BOS already in the text is not doubled


def test_added_tokens_keep_their_ids_and_raw_text():
    """CONTROL tokens written in raw text (DeepSeek's fullwidth bars) and USER_DEFINED ones (`<think>`, a
    newline pair) are matched whole, keep their GGUF ids and decode to their text."""
    meta = _byte_level_metadata("llama-bpe")
    n = len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"] += ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<think>", "\n\n"]
    meta["tokenizer.ggml.token_type"] += [3, 4, 4]
    meta["tokenizer.ggml.bos_token_id"] = n
    tok = tokenizer_from_gguf(meta, "t.gguf")
    assert tok.vocab_size == n + 3 and tok.special_ids == {0, n}
    text = "<\uff5cbegin\u2581of\u2581sentence\uff5c>hi<think>\n\nx"
    ids = tok.encode(text)
    assert ids[0] == n and ids.count(n) == 1 and ids[3:5] == [n + 1, n + 2]
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == "hi<think>\n\nx"


def test_unsupported_model():
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[PAD]", "a"]}
    with pytest.raises(ModelLoadError) as e:
        tokenizer_from_gguf(meta, "/models/x.gguf")
    assert str(e.value) == "/models/x.gguf: unsupported tokenizer model 'bert' (supported: gpt2, llama)"
    with pytest.raises(ModelLoadError, match="no tokenizer in this GGUF"):
        tokenizer_from_gguf({"general.architecture": "llama"}, "/models/x.gguf")


# -- SentencePiece (llama) vocabulary without merges -----------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello world, this is a test of the tokenizer, and these are the pieces it learns.",
    "In the beginning there was the word, and the word was tokenized into pieces: the end.",
]


def write_spm_gguf(path: Path, *, add_space_prefix: bool | None = None) -> Path:
    """A SentencePiece-style GGUF: <unk>/<s>/</s>, 256 byte tokens, BPE pieces trained on a small corpus
    with decreasing scores (as SentencePiece BPE assigns them), one user-defined token; no merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    trained = Backend(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained.train_from_iterator(SPM_CORPUS * 10, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    vocab = trained.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<think>", "</think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 4, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    return write_spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")


SPM_TEXTS = [
    "Hello the world",
    "the quick brown fox jumps over the lazy dog.",
    "In the beginning, Hello world: these pieces were tokenized",
    "  two leading spaces",
    "trailing  ",
    "tabs\tand\nnewlines\n\n",
    "日本 😀 Zürich",  # not in the vocabulary: byte fallback
    "<think>inside</think> after",
    "x <s> y </s>",
    "",
    " ",
]


def test_sentencepiece_matches_transformers(spm_gguf):
    meta = read_metadata(open_gguf(spm_gguf))
    assert "tokenizer.ggml.merges" not in meta
    ours = tokenizer_from_gguf(meta, spm_gguf)
    ref = reference_tokenizer(str(spm_gguf))
    assert ours.add_bos and ours.bos_token == "<s>" and ours.eos_token == "</s>"
    assert ours.vocab_size == len(ref)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.id_to_token(ours.encode("日", add_special_tokens=False)[1]) == "<0xE6>"
    # a BOS the text already starts with is not doubled (transformers would add a second one)
    assert (
        ours.encode("<s>x")
        == ref.encode("<s>x")[1:]
        == [1, *ours.encode("<s>x", add_special_tokens=False)[1:]]
    )


def test_sentencepiece_merges_match_transformers(spm_gguf):
    from transformers.tokenization_utils_base import generate_merges

    meta = read_metadata(open_gguf(spm_gguf))
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    merges = merges_from_scores(tokens, scores)
    assert merges == generate_merges(
        {t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores, strict=True))
    )
    assert merges[0] == ("▁", "t")  # the best-scored piece that is a pair of pieces


def test_sentencepiece_without_space_prefix(tmp_path):
    path = write_spm_gguf(tmp_path / "noprefix.gguf", add_space_prefix=False)
    tok = tokenizer_from_gguf(read_metadata(open_gguf(path)), path)
    prefixed_path = write_spm_gguf(tmp_path / "prefix.gguf")
    with_prefix = tokenizer_from_gguf(read_metadata(open_gguf(prefixed_path)), prefixed_path)
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert not tok.id_to_token(ids[0]).startswith("▁")
    assert with_prefix.id_to_token(with_prefix.encode("Hello", add_special_tokens=False)[0]).startswith("▁")
    for text in ("Hello world", " spaced  out "):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
