"""Hugging Face repo ids, resolved into local files through `huggingface_hub`'s cache.

`HF_HUB_OFFLINE`, `HF_HOME` and the cache layout are huggingface_hub's own, so an offline machine with
a populated cache works unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxrs.errors import ModelLoadError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FOLDER_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def download_repo(repo_id: str, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """Local path of the model: the snapshot folder (HF layout) or the chosen GGUF file in it."""
    from huggingface_hub import constants, list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if gguf_file:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[gguf_file]))
            if not (folder / gguf_file).is_file():
                raise ModelLoadError(repo_id, f"the repository has no file {gguf_file!r}")
            return folder / gguf_file
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FOLDER_FILES))
        if (folder / "config.json").is_file():
            return folder
        if constants.HF_HUB_OFFLINE:  # only what the cache holds
            ggufs = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf"))
        else:
            ggufs = [f for f in list_repo_files(repo_id, revision=revision) if f.endswith(".gguf")]
    except ModelLoadError:
        raise
    except RepositoryNotFoundError:
        raise ModelLoadError(
            repo_id, "no such repository on the Hugging Face Hub (or it is private)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            repo_id,
            "not in the local Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE "
            "is set or there is no network)",
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(repo_id, f"download failed ({e})") from None
    if len(ggufs) == 1:
        return download_repo(repo_id, ggufs[0], revision)
    if not ggufs:
        raise ModelLoadError(repo_id, "the repository has neither config.json nor a GGUF file")
    raise ModelLoadError(
        repo_id,
        f"the repository has several GGUF files; choose one with --gguf-file: {', '.join(sorted(ggufs))}",
    )
