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
    name = name.lstrip("/")
    adapter = [card for card in adapter_cards(ctx) if card.id == name]
    if adapter:
        return adapter[0]
    if name not in ctx.names:
        raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
    return ModelCard(name, ctx.created)
