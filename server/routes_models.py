"""GET /v1/models and /v1/models/{name}: the served model under its name and aliases."""

from __future__ import annotations

from litestar import get

from server.context import ServerContext
from server.errors import APIError
from server.routes_lora import adapter_cards
from server.schemas import ModelCard, ModelList


def served_cards(ctx: ServerContext) -> list[ModelCard]:
    """The served model under each of its names, with its source and context length as vLLM lists them."""
    limit = ctx.llm.engine.max_model_len if ctx.llm.generates else None
    return [ModelCard(n, ctx.created, root=ctx.llm.source, max_model_len=limit) for n in ctx.names]


@get("/models")
async def list_models(ctx: ServerContext) -> ModelList:
    return ModelList([*served_cards(ctx), *adapter_cards(ctx)])


@get("/models/{name:path}")
async def get_model(name: str, ctx: ServerContext) -> ModelCard:
    # The path parameter loses the leading slash of an id that has one (the model file's path alias).
    name = name.lstrip("/")
    served = served_cards(ctx)
    cards = [card for card in [*adapter_cards(ctx), *served] if card.id.lstrip("/") == name]
    if not cards:
        raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
    return cards[0]
