"""Liveness, readiness and metrics endpoints for load balancers and orchestrators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from keel.api.http import json_response
from keel.api.state import AppState
from keel.observe.metrics import CONTENT_TYPE_LATEST, render

__all__ = ["router"]

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    """The process is alive and its event loop answers. Says nothing about dependencies (that is ``/ready``)."""
    return json_response({"status": "ok"})


async def _check(aw: Awaitable[object]) -> dict[str, Any]:
    try:
        async with asyncio.timeout(2):
            await aw
    except Exception as exc:  # any failure is the answer, not an error of /ready
        return {"ok": False, "detail": str(exc) or type(exc).__name__}
    return {"ok": True}


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Each dependency's status; 503 when the database or shared state is down (under a fail-closed policy), or
    a model has no deployment able to serve. The vector index is reported (with each app collection's chunk count,
    0 until `keel ingest`) but never makes Keel unready: without it answers go on without retrieved context."""
    state: AppState = request.app.state.keel
    now = time.monotonic()
    database = {
        **await _check(state.db.ping()),
        "url": state.db.redacted_url,
        "ledger_pending": state.ledger.pending,
        "ledger_dropped": state.ledger.dropped,
    }
    counters = await _check(state.counters.ping())
    counters["backend"] = "redis" if state.config.redis_url else "in-process"
    counters["failure_policy"] = state.config.limits.failure_policy
    emergency = None
    if counters["ok"] and state.emergency.cap_micros is not None:
        emergency = await state.emergency.status()
    models = {}
    all_ok = True
    for name in state.router.names:
        deployments = {}
        serving = False
        for d in state.router.route(name).deployments:
            ok, detail = await d.provider.ready()
            cooling = d.breaker.cooling(now)
            deployments[d.id] = {
                "ok": ok and not cooling,
                "detail": detail,
                "cooling_down_s": round(d.breaker.open_until - now, 1) if cooling else 0,
            }
            serving = serving or (ok and not cooling)
        models[name] = {"ok": serving, "deployments": deployments}
        all_ok = all_ok and serving
    all_ok = all_ok and database["ok"] and (counters["ok"] or state.config.limits.failure_policy == "open")
    checks = {"database": database, "counters": counters, "models": models}
    collections = sorted({a.retrieval.collection for a in state.config.apps if a.retrieval is not None})
    if collections:  # retrieval degrades (answers go on without context), so it does not make Keel unready
        vectors = await _check(state.vectors.ping())
        if vectors["ok"]:
            vectors["chunks"] = await _chunk_counts(state, collections, now)
        checks["vector_index"] = vectors
    if emergency is not None:
        checks["emergency"] = emergency
    body = {"status": "ready" if all_ok else "degraded", "checks": checks}
    return json_response(body, 200 if all_ok else 503)


CHUNK_COUNT_TTL_S = 30.0


async def _chunk_counts(state: AppState, collections: list[str], now: float) -> dict[str, int]:
    """Each collection's chunk count, at most ``CHUNK_COUNT_TTL_S`` old: a load balancer probes /ready every few
    seconds on every worker, and with pgvector a count is a scan of the collection."""
    if state.chunk_counts is None or now - state.chunk_counts[0] >= CHUNK_COUNT_TTL_S:
        state.chunk_counts = (now, {c: await state.vectors.count(c) for c in collections})
    return state.chunk_counts[1]


@router.get("/metrics")
async def metrics() -> Response:
    return Response(render(), media_type=CONTENT_TYPE_LATEST)
