"""OpenAI error objects: every failure, Litestar's own included, answers `{"error": {...}}`.

Clients (the openai package among them) read `error.message` and pick an exception class by status,
so the shape matters more than the wording of Litestar's defaults.
"""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("jaxrs.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    503: "server_error",
}
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    499: "client_closed_request",
    503: "not_ready",
}


class APIError(Exception):
    """A failure to report to the client with this status (and, when one field is at fault, `param`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODES.get(status)


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> Response[ErrorResponse]:
    body = ErrorBody(message, _TYPES.get(status, "server_error"), param, code or _CODES.get(status))
    return Response(ErrorResponse(body), status_code=status, media_type=MediaType.JSON)


def _api_error(_: Request, exc: APIError) -> Response[ErrorResponse]:
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code)


def _http_exception(request: Request, exc: HTTPException) -> Response[ErrorResponse]:
    """Litestar's own errors (unknown route, wrong method, body too large, bad guard) in OpenAI shape."""
    status = exc.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        message = f"the request body is larger than the {limit} bytes this server accepts"
    else:
        message = exc.detail
    response = error_response(status, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _internal_error(request: Request, exc: Exception) -> Response[ErrorResponse]:
    """A bug: log it with its traceback, tell the client as little as is useful."""
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error: {type(exc).__name__}")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    APIError: _api_error,
    HTTPException: _http_exception,
    Exception: _internal_error,
}
