"""LoRA adapters over HTTP, with vLLM's routes and bodies: `POST /v1/load_lora_adapter`
`{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter` `{"lora_name"}` (served with
`--enable-runtime-lora`), and the adapters' cards in /v1/models (`parent`: the base model).

Loads and unloads run on the engine thread between steps, so no step sees half an adapter. Unloading an
adapter that running requests use takes its name away at once (new requests for it are a 404) and
answers once those requests have finished (`jaxrs.lora.serving.unload_when_idle`); the body's `timeout`
bounds the wait (a 409 after it, the adapter served again) and `force` ends the requests left then.
"""

from __future__ import annotations

import msgspec
from litestar import Request, Response, post

from jaxrs.errors import JaxrsError
from jaxrs.lora import serving
from server.body import read_json
from server.context import ServerContext, adapter_names
from server.errors import APIError
from server.schemas import ModelCard


def adapter_cards(ctx: ServerContext) -> list[ModelCard]:
    """The LoRA adapters in /v1/models: `parent` the base model's served name, `root` the adapter's path."""
    names = adapter_names(ctx.llm)
    loaded = ctx.llm.engine.loras.loaded if names else {}
    return [ModelCard(n, ctx.created, parent=ctx.served_name, root=loaded[n].adapter.path) for n in names]


class LoadLoraRequest(msgspec.Struct):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(msgspec.Struct):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; adapters are named here
    timeout: float = serving.UNLOAD_WAIT_S  # seconds to wait for the requests using the adapter
    force: bool = False  # after the wait, end those requests (finish reason "abort") rather than fail


def _text(message: str) -> Response:
    return Response(message, media_type="text/plain")


@post("/load_lora_adapter", status_code=200)
async def load_lora_adapter(request: Request, ctx: ServerContext) -> Response:
    req = await read_json(request, LoadLoraRequest)
    if req.lora_name in ctx.names:
        raise APIError(400, f"{req.lora_name!r} names the base model", param="lora_name")
    try:
        await ctx.ready_driver().run_on_engine(
            lambda engine: serving.load_adapter(engine, req.lora_name, req.lora_path)
        )
    except JaxrsError as e:
        raise APIError(400, str(e), param="lora_path", code="invalid_lora") from None
    return _text(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@post("/unload_lora_adapter", status_code=200)
async def unload_lora_adapter(request: Request, ctx: ServerContext) -> Response:
    req = await read_json(request, UnloadLoraRequest)
    if req.lora_name not in adapter_names(ctx.llm):
        raise APIError(404, f"no LoRA adapter named {req.lora_name!r} is loaded", param="lora_name")
    if req.timeout < 0:
        raise APIError(400, f"timeout must be at least 0, not {req.timeout}", param="timeout")
    try:
        await serving.unload_when_idle(
            ctx.ready_driver(), req.lora_name, timeout=req.timeout, force=req.force
        )
    except serving.AdapterInUse as e:
        raise APIError(409, str(e), param="lora_name", code="lora_in_use") from None
    except JaxrsError as e:
        raise APIError(404, str(e), param="lora_name") from None
    return _text(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def runtime_lora_routes(ctx: ServerContext) -> list:
    """The load/unload routes, when the engine was started with runtime LoRA."""
    loras = ctx.llm.engine.loras if ctx.llm.generates else None
    return [load_lora_adapter, unload_lora_adapter] if loras is not None and loras.config.runtime else []
