"""GET /v1/models and /v1/models/{name}: the served model under its name and aliases."""

from __future__ import annotations

from litestar import get

from server.context import ServerContext
from server.errors import APIError
from server.routes_lora import adapter_cards
from server.schemas import ModelCard, ModelList


@get("/models")
async def list_models(ctx: ServerContext) -> ModelList:
    return ModelList([*(ModelCard(name, ctx.created) for name in ctx.names), *adapter_cards(ctx)])


@get("/models/{name:path}")
async def get_model(name: str, ctx: ServerContext) -> ModelCard:
    # The path parameter loses the leading slash of an id that has one (the model file's path alias).
    name = name.lstrip("/")
    served = [ModelCard(n, ctx.created) for n in ctx.names]
    cards = [card for card in [*adapter_cards(ctx), *served] if card.id.lstrip("/") == name]
    if not cards:
        raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
    return cards[0]
