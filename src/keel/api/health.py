"""Liveness, readiness and metrics endpoints for load balancers and orchestrators."""

from __future__ import annotations

import time

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


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Each dependency's status; 503 when a model has no deployment able to serve."""
    state: AppState = request.app.state.keel
    now = time.monotonic()
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
    body = {"status": "ready" if all_ok else "degraded", "checks": {"models": models}}
    return json_response(body, 200 if all_ok else 503)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(render(), media_type=CONTENT_TYPE_LATEST)
