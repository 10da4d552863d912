"""jaxrs's OpenAI-compatible HTTP server (Litestar): `create_app(llm)`, or `jaxrs serve`."""

from server.app import create_app

__all__ = ["create_app"]
