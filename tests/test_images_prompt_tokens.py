"""Prompt tokenization for FLUX: CLIP's BPE built from vocab.json + merges.txt (FLUX repositories ship no
tokenizer.json for CLIP) gives transformers' `CLIPTokenizer` ids; padding and truncation keep the end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxrs.errors import ModelLoadError
from jaxrs.images.prompt_tokens import clip_bpe, load_tokenizer, token_ids

MERGES = ["r e", "e d</w>", "c a", "ca t</w>", "t h", "th e</w>", "re d</w>"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in MERGES)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 8, "pad_token": "<|endoftext|>"})
    )
    return folder


@pytest.mark.parametrize("prompt", ["The red cat", "A  RED cat, the cat's 12 cats!", "naïve café"])
def test_clip_bpe_matches_transformers(clip_folder, prompt):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer(str(clip_folder / "vocab.json"), str(clip_folder / "merges.txt"))
    assert clip_bpe(clip_folder).encode(prompt).ids == ref(prompt).input_ids


def test_padding_and_truncation_keep_the_end_token(clip_folder):
    tok, length, pad = load_tokenizer(clip_folder)
    assert length == 8
    ids = token_ids(tok, ["the red cat", "the red cat the red cat the red cat"], length, pad)
    short = tok.encode("the red cat").ids
    np.testing.assert_array_equal(ids[0], short + [pad] * (8 - len(short)))
    end = tok.token_to_id("<|endoftext|>")
    assert ids[1, -1] == end and ids[1, 0] == tok.token_to_id("<|startoftext|>")


def test_missing_tokenizer_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
