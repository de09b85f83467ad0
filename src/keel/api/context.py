"""The HTTP side of a :class:`~keel.context.RequestContext`, shared by every route that runs the pipeline: making
one, the ``x-keel-*`` headers it yields, and ending it (priced result, error, client gone)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Final

from starlette.responses import Response

from keel.api.http import error_response
from keel.api.incoming import Incoming
from keel.api.state import AppState
from keel.context import RequestContext
from keel.errors import KeelError
from keel.pipeline.accounting import Accounting, cost_header, record_request

__all__ = ["SSE_HEADERS", "closed", "fail", "keel_headers", "new_context", "price_result"]

log = logging.getLogger("keel.pipeline")

SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def new_context(request: Incoming, route: str) -> RequestContext:
    """A context whose completion records the ledger row, the log line and the metrics."""
    ctx = RequestContext(request_id=request.request_id, route=route, authorization=request.header("authorization"))
    accounting = request.state.accounting
    ctx.defer(lambda c: _record_soon(accounting, c))
    return ctx


def _record_soon(accounting: Accounting, ctx: RequestContext) -> None:
    """Record the request on the loop's next turn: after the response has gone out, since a client waiting for it
    needs none of it (budgets and limits settle before, in the admission stage's hook)."""
    if ctx.ended is None:  # the request's latency ends here, not when the recording runs
        ctx.ended = time.perf_counter()
    asyncio.get_running_loop().call_soon(_record, accounting, ctx)


def _record(accounting: Accounting, ctx: RequestContext) -> None:
    """The ledger row, then the log line and metrics; a failure of either is logged and spares the other."""
    for record in (accounting.record, record_request):
        try:
            record(ctx)
        except Exception:
            log.exception("recording request %s failed", ctx.request_id)


def keel_headers(ctx: RequestContext) -> dict[str, str]:
    # The model is the client's string until the router has accepted it: echoed only when a header can carry it.
    model = ctx.public_model or ""
    headers = {"x-keel-model": model if _PRINTABLE.fullmatch(model) else "", **ctx.response_headers}
    if ctx.deployment:
        headers["x-keel-cost-usd"] = cost_header(ctx)
        headers["x-keel-deployment"] = ctx.deployment
    headers["x-keel-attempts"] = str(len(ctx.attempts))
    if ctx.fallback_from:
        headers["x-keel-fallback-from"] = ctx.fallback_from
    return headers


async def fail(ctx: RequestContext, exc: KeelError) -> Response:
    ctx.fail(exc)
    await ctx.finish()
    return error_response(exc, keel_headers(ctx))


async def closed(ctx: RequestContext) -> Response:
    ctx.status, ctx.outcome = 499, "client_closed"
    await ctx.finish()
    return Response(status_code=499)


def price_result(ctx: RequestContext, result: dict[str, Any], state: AppState) -> None:
    """Price a complete (non-streamed) result and put Keel's ``cost`` (US dollars) in its ``usage``."""
    usage = result.get("usage")
    ctx.usage = usage if isinstance(usage, dict) else None
    state.accounting.price(ctx)
    if ctx.usage is not None:
        result["usage"] = {**ctx.usage, "cost": None if ctx.cost_micros is None else ctx.cost_micros / 1_000_000}
