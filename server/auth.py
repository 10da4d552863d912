"""Bearer-token check for /v1 routes (health and metrics stay open for probes and scrapers)."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.types import Guard

from server.errors import APIError


def api_key_guard(api_key: str) -> Guard:
    """A guard that answers 401 unless the request carries `Authorization: Bearer <api_key>`."""
    expected = api_key.encode()

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'")

    return guard
