"""Text <-> token ids for the engine, on top of the Rust `tokenizers` library (no transformers at runtime).

`Tokenizer` owns the decisions the backend leaves open: whether a BOS/EOS is added (the flags, not the
backend's post-processor, decide, so a BOS is never doubled), which ids end generation, and the chat
template. `IncrementalDetokenizer` turns a stream of generated ids into text deltas that never split a
UTF-8 character.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jaxrs.chat_template import open_final_message, render_chat_template
from jaxrs.errors import JaxrsError, ModelLoadError

log = logging.getLogger("jaxrs")

_REPLACEMENT = "\ufffd"  # what a decoder emits for bytes that do not (yet) form a UTF-8 character


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token policy and chat template of one model."""

    def __init__(
        self,
        *,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        unk_token_id: int | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos = bool(add_bos) and bos_token_id is not None
        self.add_eos = bool(add_eos) and bool(self.eos_token_ids)
        self.chat_template = chat_template
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # -- special tokens --------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the first of `eos_token_ids`); all of them stop generation."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def pad_token(self) -> str | None:
        return self.id_to_token(self.pad_token_id) if self.pad_token_id is not None else None

    @property
    def unk_token(self) -> str | None:
        return self.id_to_token(self.unk_token_id) if self.unk_token_id is not None else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encode / decode -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. With
        `add_special_tokens`, BOS/EOS are added per `add_bos`/`add_eos`, but not when the text already
        starts with BOS (a chat template that writes `{{ bos_token }}`) or ends with EOS."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos and (not ids or ids[-1] != self.eos_token_id):
                ids.append(self.eos_token_id)
        return ids

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        """How many tokens `encode(text)` yields (prompt budgets, usage reports)."""
        return len(self.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; incomplete UTF-8 sequences come out as U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (byte-level spelling for BPE vocabularies), None if unknown."""
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.special_ids

    # -- chat ------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text for a conversation, rendered with the model's chat template (as transformers
        does, with the special tokens as template variables). Encode it with `add_special_tokens=False`
        or rely on `encode` not doubling a BOS the template already wrote. `continue_final_message`
        leaves the final message open, for the model to continue (not with `add_generation_prompt`)."""
        if continue_final_message and add_generation_prompt:
            raise JaxrsError("continue_final_message and add_generation_prompt cannot both be set")
        if not self.chat_template:
            raise JaxrsError(
                "this model has no chat template (none in its tokenizer files or GGUF metadata); "
                "use the plain completions endpoint, or pass a tokenizer folder that has one"
            )
        specials = {"unk_token": self.unk_token, "pad_token": self.pad_token}
        specials = {k: v for k, v in specials.items() if v is not None}
        rendered = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools,
            **{**specials, **extra},
        )
        return open_final_message(rendered, messages) if continue_final_message else rendered

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json (required), tokenizer_config.json,
        chat_template.jinja / chat_template.json, generation_config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(tok_file, "missing tokenizer.json (jaxrs needs the fast-tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a plain Exception with the serde message
            raise ModelLoadError(tok_file, f"cannot parse tokenizer.json ({e})") from None
        # Padding and truncation set in the file (all-MiniLM pads every input to 128) would change the
        # ids; lengths are the engine's business.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        def special_id(name: str) -> int | None:
            content = _token_content(config.get(name))
            if content is None:
                return None
            token_id = backend.token_to_id(content)
            if token_id is None:
                log.warning("%s: %s %r is not in the vocabulary; ignored", path, name, content)
            return token_id

        bos = special_id("bos_token")
        if bos is None:
            bos = _first_id(gen.get("bos_token_id"))
        eos_ids = [i for i in [special_id("eos_token"), *_id_list(gen.get("eos_token_id"))] if i is not None]
        pad = special_id("pad_token")
        if pad is None:
            pad = _first_id(gen.get("pad_token_id"))

        # The backend's post-processor decides whether transformers adds BOS/EOS unless the config says.
        probe_with = backend.encode("a", add_special_tokens=True).ids
        probe_without = backend.encode("a", add_special_tokens=False).ids
        if bos is None and len(probe_with) == len(probe_without) + 1 and probe_with[1:] == probe_without:
            bos = probe_with[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and probe_with[:1] == [bos] and probe_without[:1] != [bos]
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            eos = eos_ids[0] if eos_ids else None
            add_eos = eos is not None and probe_with[-1:] == [eos] and probe_without[-1:] != [eos]

        return cls(
            backend=backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=_folder_chat_template(path, config),
            unk_token_id=special_id("unk_token"),
        )


def _read_json(file: Path) -> dict[str, Any]:
    """An optional JSON file's object ({} if absent); a broken one is an error naming it."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(file, f"cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(file, f"expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(spec: Any) -> str | None:
    """A special token given as a string or as a serialized AddedToken ({"content": ...})."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("content"), str):
        return spec["content"]
    return None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


def _first_id(value: Any) -> int | None:
    ids = _id_list(value)
    return ids[0] if ids else None


def _folder_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (how transformers >= 4.43 saves it) wins over chat_template.json, which wins
    over tokenizer_config.json's `chat_template` (a string, or a list of {name, template})."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if named:
            name, chosen = next(iter(named.items()))
            log.warning("%s: no 'default' chat template; using %r", path, name)
            return chosen
        return None
    return template if isinstance(template, str) else None


class IncrementalDetokenizer:
    """Turn generated ids into text deltas for streaming, one id at a time.

    Decoding ids one by one breaks characters split over several byte tokens (emoji, CJK) and spaces
    some decoders only produce with context. So, as vLLM does, each step decodes a small window: the
    text of ids[prefix_offset:read_offset] (already emitted) and of ids[prefix_offset:]; the difference
    is new text, held back while it ends in U+FFFD (an incomplete character). With no prompt ids, or a
    decoder that does not strip a leading space, the pushes concatenate to `decode(generated ids)`.
    """

    _CONTEXT = 5  # prompt ids decoded as left context for the first generated ids

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids if not self._skipped(int(i))]
        self._prefix_offset = max(len(self._ids) - self._CONTEXT, 0)
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pieces: list[str] = []

    def _skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self.tokenizer.special_ids

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.backend.decode(self._ids[start:stop], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        if self._skipped(token_id):
            return ""
        self._ids.append(token_id)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Emit whatever is held back (at the end of generation), incomplete characters as U+FFFD."""
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(self._prefix_text):
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)
