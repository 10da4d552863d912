"""Tiny sentence-embedding folders written offline for the embedding tests, and the reference pooling
(sentence-transformers' definitions, in torch) the tests compare against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = 60  # word tokens w4..w63 after [PAD] [UNK] [CLS] [SEP]


def save_wordpiece_tokenizer(path: Path, vocab_size: int) -> None:
    """A BERT-style tokenizer over `w4 w5 ...` words: [CLS] text [SEP], fixed padding switched on (as
    all-MiniLM ships it), which must not change what is embedded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_padding(length=32, pad_id=0, pad_token="[PAD]")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))


def write_sentence_transformers(
    path: Path, pooling: tuple[str, ...], *, normalize: bool, max_seq_length: int | None = None
) -> None:
    """modules.json (Transformer, Pooling, optional Normalize) and the pooling config."""
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({key: m in pooling for m, key in keys.items()})
    )
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def reference_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling for one mode over `[B, T, H]` states and a `[B, T]` 0/1 mask."""
    m = mask[..., None].to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "lasttoken":
        return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    raise ValueError(mode)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def random_sentences(rng: np.random.Generator, count: int, longest: int) -> list[str]:
    return [
        " ".join(f"w{w}" for w in rng.integers(4, 4 + WORDS, rng.integers(1, longest + 1)))
        for _ in range(count)
    ]
