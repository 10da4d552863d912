"""Request bodies: JSON -> a schema Struct, with malformed JSON and wrong types as 400s naming the field.

Litestar enforces the body size limit while reading (413); decoding here, rather than through a typed
`data` parameter, keeps every error in the OpenAI shape with the offending field as `param`.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from litestar import Request

from server.errors import APIError

T = TypeVar("T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")


async def read_json(request: Request, schema: type[T]) -> T:
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as e:
        match = _PATH.search(str(e))
        raise APIError(400, f"invalid request: {e}", param=match.group(1) if match else None) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:  # msgspec checks UTF-8 only while building a str
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} in a string)") from None
    except RecursionError:  # a schema (or any value) nested past Python's recursion limit
        raise APIError(400, "the request body is nested too deeply") from None
