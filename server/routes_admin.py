"""POST /v1/re_isq (and /re_isq): quantize the served weights to another format without a restart.

The engine thread does it between steps: requests arriving meanwhile wait, those in flight recompute
their tokens with the new weights and carry on. The answer reports what changed (weight bytes, KV
blocks, seconds). An unknown format is a 400 that leaves the model as it was; a failed load is a 500
after the old weights are back in service.
"""

from __future__ import annotations

import msgspec
from litestar import Request, post

from jaxrs.engine.requantize import RequantizeError
from jaxrs.errors import JaxrsError
from server.body import read_json
from server.context import ServerContext
from server.errors import APIError


class ReIsqRequest(msgspec.Struct, forbid_unknown_fields=True):
    ggml_type: str  # any `jaxrs.quant` format name: Q4K, Q4_K, Q8_0, HQQ4, 4, 8...


@post("/re_isq", status_code=200)
async def re_isq(request: Request, ctx: ServerContext) -> dict[str, object]:
    req = await read_json(request, ReIsqRequest)
    driver = ctx.ready_driver()
    try:
        done = await driver.requantize(req.ggml_type)
    except RequantizeError as e:
        raise APIError(500, str(e), code="re_isq_failed") from None
    except JaxrsError as e:
        raise APIError(400, str(e), param="ggml_type", code="invalid_ggml_type") from None
    return done.summary()
