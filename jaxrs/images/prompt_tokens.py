"""Prompts -> fixed-length token ids for the two text encoders, with the `tokenizers` library: CLIP's
padded to its 77 positions, T5's to the pipeline's maximum sequence length (both truncated, as FLUX
pipelines do), so each prompt batch has one shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxrs.errors import ModelLoadError


def load_tokenizer(folder: Path) -> tuple[Tokenizer, int, int]:
    """The tokenizer in `folder` with its model_max_length and pad id (tokenizer.json, or CLIP's
    vocab.json + merges.txt)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = clip_bpe(folder)
    else:
        raise ModelLoadError(folder, "no tokenizer.json (or vocab.json and merges.txt) in this folder")
    pad = config.get("pad_token", "<pad>")
    pad = pad["content"] if isinstance(pad, dict) else pad
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ModelLoadError(folder, f"the pad token {pad!r} is not in the vocabulary")
    return tok, int(min(config.get("model_max_length", 77), 10**6)), pad_id


def clip_bpe(folder: Path) -> Tokenizer:
    """CLIP's byte-level BPE from vocab.json and merges.txt (lower-cased, words end in `</w>`, wrapped
    in start and end tokens), built as transformers' converter builds it."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    bpe = models.BPE.from_file(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        unk_token="<|endoftext|>",
        fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(r"\s+", " "), normalizers.Lowercase()]
    )
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    from tokenizers import Regex

    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), add_prefix_space=False, trim_offsets=False
    )
    return tok


def token_ids(tok: Tokenizer, prompts: list[str], length: int, pad_id: int) -> np.ndarray:
    """`[len(prompts), length]` ids: each prompt encoded with its special tokens, truncated (keeping
    the final end token) or padded to `length`."""
    out = np.full((len(prompts), length), pad_id, np.int32)
    for row, enc in enumerate(tok.encode_batch(prompts)):
        ids = enc.ids
        if len(ids) > length:
            ids = ids[: length - 1] + ids[-1:]
        out[row, : len(ids)] = ids
    return out
