"""Rebuild a `tokenizers.Tokenizer` from the vocabulary a GGUF file carries in its metadata.

A GGUF has no tokenizer.json: it stores tokens, scores, token types and merges under llama.cpp's key
names, plus a pre-tokenizer name (`tokenizer.ggml.pre`) that selects llama.cpp's splitting rules. We
rebuild the tokenizer so it splits text the way llama.cpp does for that name:

- `gpt2`: byte-level BPE. The pre-tokenizer is a sequence of regex splits chosen by `tokenizer.ggml.pre`
  (llama.cpp's `llm_tokenizer_bpe`), then the GPT-2 byte-to-unicode mapping.
- `llama`: SentencePiece BPE. Merges are recovered from the token scores when the file has none (llama.cpp
  merges the highest-scoring pair first), unknown characters fall back to `<0xNN>` byte tokens, and
  spaces become `▁` with an optional prefix space (built as transformers' LlamaTokenizer does).

CONTROL tokens become special added tokens and USER_DEFINED tokens plain added tokens, so both are matched
whole in the text. User-defined tokens are matched after normalization, as SentencePiece matches them (in
a SentencePiece vocabulary, after spaces became `▁`: Gemma's whitespace-run tokens).

A file without a chat template gets its architecture's built-in one (`jaxrs.default_chat_templates`) if
its name marks it instruction-tuned.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jaxrs.default_chat_templates import default_chat_format
from jaxrs.errors import ModelLoadError
from jaxrs.tokenizer import Tokenizer

log = logging.getLogger("jaxrs")

# llama.cpp's token types (`llama_token_type`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")

# The regexes of llama.cpp's llm_tokenizer_bpe. Each is applied in turn to the pieces the previous ones
# produced, keeping both matches and the text between them (= tokenizers' Split(behavior="isolated")).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (  # the original tokenizer.json form; llama.cpp rewrites the classes for its own regex engine
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Written with escapes: these classes hold characters that Unicode normalization would silently change.
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[\u0041-\u005a\u0061-\u007a\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc"
    "\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK_CODER = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
)
_DEEPSEEK_V3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
_FALCON = ("[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]")
_BLOOM = (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",)

# Pre-tokenizer names (as llama.cpp's convert_hf_to_gguf.py writes them) -> splitting rules. The GPT-2
# names use tokenizers' ByteLevel with its built-in GPT-2 regex (for "default", a name current converters
# do not write, llama.cpp adds punctuation and digit-group splits; we keep plain GPT-2). The digit names
# split each digit off first (llama.cpp's "\p{N}" step), as those models' own tokenizer.json files do.
_GPT2_NAMES = (
    "default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "roberta-bpe", "gigachat",
    "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
)  # fmt: skip
_DIGITS_GPT2_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
_REGEX_SPLITS: dict[str, tuple[str, ...]] = {
    **{name: (_LLAMA3,) for name in (*_LLAMA3_NAMES, "dbrx", "smaug-bpe", "chatglm-bpe")},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan")},
    **{name: (_GPT4O,) for name in ("gpt-4o", "llama4")},
    "tekken": (_TEKKEN,),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "deepseek-v3": _DEEPSEEK_V3,
    "falcon": _FALCON,
    **{name: _BLOOM for name in ("bloom", "poro-chat", "gpt3-finnish")},
    "viking": (*_BLOOM, "\\p{N}"),
}
# llama.cpp uses a vocabulary word whole before trying merges for these (tokenizers' ignore_merges) and,
# when the file does not say, adds BOS.
_IGNORE_MERGES_NAMES = (*_LLAMA3_NAMES, "tekken")


def tokenizer_from_gguf(metadata: dict[str, Any], path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (`read_metadata` output); `path` names it in errors."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ModelLoadError(
            path,
            "no tokenizer in this GGUF file (tokenizer.ggml.model/tokens missing); pass a tokenizer folder",
        )
    if model not in SUPPORTED_MODELS:
        raise ModelLoadError(
            path, f"unsupported tokenizer model {model!r} (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    n = len(tokens)
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    if len(types) != n:
        raise ModelLoadError(path, f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def token_id(key: str, default: int | None = None) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}", default)
        if value is None or int(value) in (-1, 0xFFFFFFFF):  # how some converters write "none"
            return None
        if not 0 <= int(value) < n:
            log.warning(
                "%s: tokenizer.ggml.%s = %s is outside the vocabulary (%d tokens); ignored",
                path,
                key,
                value,
                n,
            )
            return None
        return int(value)

    pre = metadata.get("tokenizer.ggml.pre")
    if model == "llama":
        # llama.cpp's defaults for a SentencePiece vocabulary that does not name its special tokens
        bos, eos, unk = (
            token_id("bos_token_id", 1),
            token_id("eos_token_id", 2),
            token_id("unknown_token_id", 0),
        )
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        tokens = _sentencepiece_spelling(tokens, types)
        backend = _sentencepiece_bpe(tokens, types, metadata, unk, add_space_prefix, path)
        add_bos_default = True
    else:
        bos, eos, unk = token_id("bos_token_id"), token_id("eos_token_id"), token_id("unknown_token_id")
        backend = _byte_level_bpe(tokens, types, metadata, pre, path)
        add_bos_default = pre in _IGNORE_MERGES_NAMES
    pad = token_id("padding_token_id")
    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    chat_template, turn_end = _chat_template(metadata, tokens, path)
    eos_ids += turn_end

    _add_special_tokens(backend, tokens, types, {i for i in (bos, eos, unk, pad, *eos_ids) if i is not None})
    return Tokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        unk_token_id=unk,
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=chat_template,
    )


def _chat_template(
    metadata: dict[str, Any], tokens: list[str], path: str | Path
) -> tuple[str | None, list[int]]:
    """The file's chat template, else its architecture's built-in one if the file names an instruction-tuned
    model; and the id of the built-in format's end-of-turn token, which ends generation whichever template
    renders the chat (as llama.cpp stops at it).

    A base model gets no built-in template: it was not tuned on the turn format (Gemma 3 270M base answers
    a turn-formatted question with noise, transformers' tokens identical), while it completes plain text
    well; without a template, callers complete prompts as text.
    """
    template = metadata.get("tokenizer.chat_template") or None
    chat_format = default_chat_format(metadata.get("general.architecture"))
    if chat_format is None:
        return template, []
    if template is None and _instruction_tuned(metadata):
        log.warning(
            "%s: no chat template in the file; using the built-in %s turn format", path, chat_format.name
        )
        template = chat_format.template
    elif template is None:
        log.info(
            "%s: no chat template in the file, and neither general.finetune nor general.name marks it "
            "instruction-tuned: no built-in %s turn format for a base model",
            path,
            chat_format.name,
        )
    turn_end = [i for i, token in enumerate(tokens) if token == chat_format.end_of_turn][:1]
    return template, turn_end


_TUNED_WORDS = {"it", "instruct", "chat"}


def _instruction_tuned(metadata: dict[str, Any]) -> bool:
    """llama.cpp's converter takes `general.finetune` from the model's name ("gemma-3-1b-it" -> "it")."""
    names = f"{metadata.get('general.finetune') or ''} {metadata.get('general.name') or ''}"
    return bool(_TUNED_WORDS & set(re.split(r"[^a-z0-9]+", names.lower())))


# -- byte-level BPE ------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: the alphabet byte-level vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _byte_level_bpe(
    tokens: list[str], types: list[int], metadata: dict[str, Any], pre: str | None, path: str | Path
) -> Backend:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # Added tokens keep their raw text (they are matched in the raw input). A normal token written in
        # plain characters (some converters do so for spaces) is respelled so BPE can produce it.
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = i
    merges = _parse_merges(metadata.get("tokenizer.ggml.merges") or [], vocab, path)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _IGNORE_MERGES_NAMES,
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str | None, path: str | Path) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's splitting rules for `tokenizer.ggml.pre`, then the byte-to-unicode mapping."""
    if pre is None or pre in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_GPT2_NAMES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    splits = _REGEX_SPLITS.get(pre)
    if splits is None:
        log.warning(
            "%s: unknown pre-tokenizer %r; splitting text with the GPT-2 regex, tokens may differ from "
            "the model's own tokenizer",
            path,
            pre,
        )
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _parse_merges(lines: list[str], vocab: dict[str, int], path: str | Path) -> list[tuple[str, str]]:
    """Merge lines ("left right") -> pairs; pairs whose parts or result are not in the vocabulary are dropped
    (tokenizers refuses them, and BPE could never use them)."""
    merges = []
    dropped = 0
    for line in lines:
        parts = line.split(" ")
        pair = None
        if len(parts) == 2:
            pair = (parts[0], parts[1])
        else:  # a token containing a space: take the split whose both sides are tokens
            for k in range(1, len(parts)):
                left, right = " ".join(parts[:k]), " ".join(parts[k:])
                if left in vocab and right in vocab:
                    pair = (left, right)
                    break
        if pair is None or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            dropped += 1
            continue
        merges.append(pair)
    if dropped:
        log.warning("%s: %d merges refer to tokens outside the vocabulary; ignored", path, dropped)
    return merges


# -- SentencePiece BPE ---------------------------------------------------------------------------------


def _sentencepiece_bpe(
    tokens: list[str],
    types: list[int],
    metadata: dict[str, Any],
    unk: int | None,
    add_space_prefix: bool,
    path: str | Path,
) -> Backend:
    vocab = {token: i for i, token in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges"):
        merges = _parse_merges(metadata["tokenizer.ggml.merges"], vocab, path)
    else:
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise ModelLoadError(
                path, f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
            )
        merges = merges_from_scores(tokens, scores)
    unk_token = tokens[unk] if unk is not None else ("<unk>" if "<unk>" in vocab else None)
    backend = Backend(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True, dropout=None
        )
    )
    # Spaces become `▁` before user-defined tokens are matched (SentencePiece normalizes first); the
    # pre-tokenizer then only adds the prefix `▁`.
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _sentencepiece_spelling(tokens: list[str], types: list[int]) -> list[str]:
    """Tokens as SentencePiece spells them. llama.cpp's converter writes user-defined pieces with `▁` turned
    into spaces (Gemma's "▁▁" as "  ", to match them in raw text); SentencePiece, and transformers, match
    them after normalization, so "▁ x" gives "▁▁" there: restore the `▁`."""
    return [t.replace(" ", "▁") if kind == USER_DEFINED else t for t, kind in zip(tokens, types, strict=True)]


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    first by the merged token's score (llama.cpp's SPM tokenizer merges the highest-scoring pair).

    Ties are ordered as transformers orders them (longer left piece first, then by the pieces' ids), so
    both build the same tokenizer from the same file.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    score_of = dict(zip(tokens, scores, strict=True))
    found: list[tuple[float, str, str]] = []
    for token, score in score_of.items():
        local = []
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                local.append((score, left, right))
        local.sort(key=lambda m: (vocab[m[1]], vocab[m[2]]))
        found.extend(local)
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


# -- added tokens --------------------------------------------------------------------------------------


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int], named: set[int]) -> None:
    """CONTROL tokens and the named special tokens (bos/eos/unk/pad/eot) as special added tokens,
    USER_DEFINED ones (e.g. `<think>`) as plain added tokens: both are then matched whole (special ones in
    the raw text, as llama.cpp's special-token partition does; user-defined ones in the normalized text, as
    SentencePiece does), and only the special ones are dropped by `decode(skip_special_tokens=True)`."""
    # Only a token whose text is its own id in the vocabulary can be added without growing the vocabulary
    # (a normal token respelled into the byte alphabet, or a duplicated string, cannot).
    addable = lambda i: bool(tokens[i]) and backend.token_to_id(tokens[i]) == i
    special = [i for i, kind in enumerate(types) if (kind == CONTROL or i in named) and addable(i)]
    user = [i for i, kind in enumerate(types) if kind == USER_DEFINED and i not in named and addable(i)]
    if special:
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    if user:
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=True) for i in user])
