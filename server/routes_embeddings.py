"""POST /v1/embeddings: texts or token ids -> vectors, as floats or base64 float32.

The embedding runs in a worker thread (`jaxrs.embedding.Embedder`, one batch at a time), so the event
loop and the generation engine's thread keep going meanwhile. An embedding-only model answers the
generation routes with a 400 saying so.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from litestar import Request, Response, post

from jaxrs.embedding import EmbeddingInputError, Input
from server.body import read_json
from server.context import ServerContext, new_id
from server.embedding_schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from server.errors import APIError
from server.request_log import RequestRecord

ROUTE = "/v1/embeddings"
_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def embedding_inputs(value: str | list) -> list[Input]:
    """The request's inputs as a list of texts or of token-id lists (one kind, not mixed)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [value]
    if all(isinstance(x, str) for x in value) or all(isinstance(x, list) for x in value):
        return value
    raise APIError(400, f"input must be {_FORMS}, not a mix", param="input")


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@post(ROUTE.removeprefix("/v1"), status_code=200)
async def embeddings(request: Request, ctx: ServerContext) -> Response[EmbeddingList]:
    record = RequestRecord(new_id("embd"), ROUTE)
    try:
        req = await read_json(request, EmbeddingRequest)
        record.model = ctx.check_model(req.model)
        embedder = ctx.embedder()
        if req.encoding_format not in ("float", "base64"):
            raise APIError(
                400,
                f"encoding_format must be 'float' or 'base64', not {req.encoding_format!r}",
                param="encoding_format",
            )
        inputs = embedding_inputs(req.input)
        record.prompt = req.input
        try:
            out = await asyncio.to_thread(
                embedder.embed,
                inputs,
                dimensions=req.dimensions,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
            )
        except EmbeddingInputError as e:
            raise APIError(400, str(e), param=e.param) from None
        record.prompt_tokens = sum(out.num_tokens)
        data = [Embedding(i, encode(v, req.encoding_format)) for i, v in enumerate(out.vectors)]
        usage = EmbeddingUsage(record.prompt_tokens, record.prompt_tokens)
        ctx.log_request(record)
        return Response(EmbeddingList(data, record.model, usage))
    except Exception as e:
        ctx.log_failure(record, e)
        raise


@post(["/chat/completions", "/completions"], status_code=400)
async def generation_refused(ctx: ServerContext) -> None:
    """The generation routes of a server whose model only embeds."""
    raise APIError(
        400,
        f"{ctx.served_name} is an embedding model: it serves /v1/embeddings, not text generation",
        param="model",
        code="model_not_supported",
    )
