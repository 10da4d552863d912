"""Write a `Tokenizer` as Hugging Face tokenizer files that `Tokenizer.from_hf_folder` reads back identically.

tokenizer.json carries the backend (vocabulary, merges, added tokens, pre-tokenizer); tokenizer_config.json
names the special tokens, says whether BOS/EOS are added and holds the chat template. A tokenizer that
stops on several ids (a GGUF's eos, eot and eom) lists them in generation_config.json's `eos_token_id`,
as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxrs.errors import JaxrsError
from jaxrs.tokenizer import Tokenizer

_SAME = ("bos_token_id", "eos_token_ids", "pad_token_id", "unk_token_id", "add_bos", "add_eos")
_SAME += ("chat_template", "special_ids")


def save_tokenizer(tok: Tokenizer, folder: Path, generation_config: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json into `folder`; return `generation_config` as it
    must be written beside them (its `eos_token_id` extended when the tokenizer stops on more ids)."""
    tok.backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, token_id in (
        ("bos_token", tok.bos_token_id),
        ("eos_token", tok.eos_token_id),
        ("pad_token", tok.pad_token_id),
        ("unk_token", tok.unk_token_id),
    ):
        if token_id is not None:
            config[key] = tok.id_to_token(token_id)
    config |= {"add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # from_hf_folder falls back on generation_config.json for the ids tokenizer_config.json does not name
    gen = dict(generation_config)
    for key, value in (("bos_token_id", tok.bos_token_id), ("pad_token_id", tok.pad_token_id)):
        if value is None:
            gen.pop(key, None)
    listed = gen.get("eos_token_id")
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    if list(dict.fromkeys(tok.eos_token_ids[:1] + listed)) != tok.eos_token_ids:
        gen["eos_token_id"] = tok.eos_token_ids
    return gen


def check_same_tokenizer(saved: Tokenizer, loaded: Tokenizer, folder: Path) -> None:
    """Raise if the tokenizer read back from `folder` differs from the one written there."""
    differ = [name for name in _SAME if getattr(saved, name) != getattr(loaded, name)]
    if json.loads(saved.backend.to_str()) != json.loads(loaded.backend.to_str()):
        differ.append("tokenizer.json")
    if differ:
        raise JaxrsError(
            f"{folder}: the tokenizer does not survive being written as tokenizer files "
            f"({', '.join(differ)} differ); pass --tokenizer with a Hugging Face tokenizer folder"
        )
