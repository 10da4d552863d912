"""POST /v1/embeddings request and response bodies (OpenAI's shapes) as msgspec Structs."""

from __future__ import annotations

from typing import Literal

import msgspec


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # str, list[str], list[int] or list[list[int]]; msgspec allows one array type per union, so the
    # list's items are checked by `server.routes_embeddings.embedding_inputs`.
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: str = "float"  # "float" | "base64" (checked by the route, to name both)
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # cut longer inputs to this many tokens (-1: the model's limit)


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
