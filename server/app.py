"""The app factory: routes, errors, auth, metrics, and the engine driver's lifetime.

The AsyncEngine (the thread that steps the engine) starts in the app's lifespan and stops with it, so an
app that has not started answers /health with 503 and never touches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from litestar import Litestar, Router
from litestar.di import Provide

from jaxrs.engine.options import MAX_WAITING
from jaxrs.images import ImageModel
from jaxrs.llm import LLM
from jaxrs.parallel.data_parallel import drive
from server.auth import api_key_guard
from server.context import ServerContext
from server.errors import EXCEPTION_HANDLERS
from server.request_log import RequestLog
from server.routes_admin import re_isq
from server.routes_chat import chat_completions
from server.routes_completions import completions
from server.routes_embeddings import embeddings, generation_refused
from server.routes_health import health, metrics
from server.routes_images import image_routes
from server.routes_lora import runtime_lora_routes
from server.routes_models import get_model, list_models
from server.routes_tokenize import detokenize, tokenize

log = logging.getLogger("jaxrs.server")

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def create_app(
    llm: LLM,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_waiting: int = MAX_WAITING,
    request_log: str | Path | None = None,
    log_full_text: bool = False,
    chat_template: str | None = None,
    enable_embeddings: bool = False,
    image_model: ImageModel | None = None,
    image_output_dir: str | Path = "jaxrs-images",
    tool_call_parser: str | None = None,
) -> Litestar:
    """An OpenAI-compatible app serving `llm`. `chat_template` (template text) overrides the model's;
    `api_key` guards /v1 and /re_isq; `request_log` appends one JSON line per request.
    `enable_embeddings` serves /v1/embeddings from a generation model too (an embedding model always does,
    and refuses the generation routes). `image_model` adds /v1/images/generations, its `url` images stored
    in `image_output_dir`. `tool_call_parser` (hermes, mistral, llama3_json) overrides the tool-call format
    read from the chat template.

    Only one started app may drive an LLM at a time, and not while `llm.generate` runs elsewhere.
    """
    ctx = ServerContext.build(
        llm,
        served_model_name=served_model_name,
        max_waiting=max_waiting,
        request_log=RequestLog(request_log, full_text=log_full_text) if request_log else None,
        chat_template=chat_template,
        embeddings=enable_embeddings,
        tool_call_parser=tool_call_parser,
    )

    @contextlib.asynccontextmanager
    async def engine_lifespan(_: Litestar) -> AsyncIterator[None]:
        if not llm.generates:  # an embedding model: no engine to drive
            log.info("serving embeddings from %s", ctx.served_name)
            yield
            return
        driver = drive(llm.replicas, max_waiting=max_waiting)  # an AsyncEngine, or a router over replicas
        ctx.metrics.attach(llm.engine, driver)
        ctx.driver = driver
        log.info("serving %s (aliases: %s)", ctx.served_name, ", ".join(ctx.names[1:]) or "none")
        try:
            yield
        finally:
            ctx.driver = None
            llm.engine.stop_warmup()
            await asyncio.to_thread(driver.shutdown)  # aborts and fails what is still in flight

    guards = [api_key_guard(api_key)] if api_key else None
    generation = [chat_completions, completions, re_isq] if llm.generates else [generation_refused]
    images = image_routes(image_model, image_output_dir) if image_model is not None else []
    handlers = [*generation, embeddings, list_models, get_model, *images, *runtime_lora_routes(ctx)]
    v1 = Router("/v1", route_handlers=handlers, guards=guards)
    root = [re_isq, tokenize, detokenize]  # /re_isq, and vLLM's /tokenize and /detokenize
    admin = [Router("/", route_handlers=root, guards=guards)] if llm.generates else []
    app = Litestar(
        route_handlers=[v1, *admin, health, metrics],
        dependencies={"ctx": Provide(lambda: ctx, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[engine_lifespan],
        request_max_body_size=max_body_bytes,
        openapi_config=None,
        logging_config=None,  # leave the process's logging (the CLI's format) as it is
    )
    app.state.ctx = ctx
    # Litestar middleware only sees matched routes; wrapping the app's ASGI handler counts 404s too.
    app.asgi_handler = ctx.metrics.instrument(app.asgi_handler)
    return app
