"""The OpenAI-compatible surface: ``/v1/chat/completions``, ``/v1/models``, ``/v1/embeddings``. Any OpenAI SDK
works against Keel by changing ``base_url``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from keel.api.http import ClientClosed, error_response, json_response, read_json, until_disconnect
from keel.api.schemas import ChatCompletionRequest, EmbeddingRequest, validate
from keel.api.state import AppState
from keel.api.streaming import sse_events
from keel.context import RequestContext
from keel.errors import KeelError
from keel.pipeline.accounting import cost_header, record_request
from keel.pipeline.auth import check_model

__all__ = ["HOT_ROUTES", "router"]

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _ctx(request: Request, route: str, state: AppState) -> RequestContext:
    ctx = RequestContext(
        request_id=request.scope["state"]["request_id"], route=route, authorization=request.headers.get("authorization")
    )
    ctx.defer(record_request)
    ctx.defer(state.accounting.record)
    return ctx


def _headers(ctx: RequestContext) -> dict[str, str]:
    headers = {"x-keel-model": ctx.public_model or "", **ctx.response_headers}
    if ctx.deployment:
        headers["x-keel-cost-usd"] = cost_header(ctx)
    if ctx.deployment:
        headers["x-keel-deployment"] = ctx.deployment
    headers["x-keel-attempts"] = str(len(ctx.attempts))
    if ctx.fallback_from:
        headers["x-keel-fallback-from"] = ctx.fallback_from
    return headers


async def _fail(ctx: RequestContext, exc: KeelError) -> Response:
    ctx.fail(exc)
    await ctx.finish()
    return error_response(exc, _headers(ctx))


async def _closed(ctx: RequestContext) -> Response:
    ctx.status, ctx.outcome = 499, "client_closed"
    await ctx.finish()
    return Response(status_code=499)


@router.post(
    "/v1/chat/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
        }
    },
)
async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.keel
    ctx = _ctx(request, "openai.chat", state)
    try:
        ctx.principal = await state.auth.principal(ctx.authorization)
        body = await read_json(request, state.config.server.max_body_bytes)
        req = validate(ChatCompletionRequest, body)
        ctx.body, ctx.public_model, ctx.stream = body, req.model, bool(req.stream)
        result = await until_disconnect(request, state.pipeline.chat(ctx))
    except KeelError as exc:
        return await _fail(ctx, exc)
    except ClientClosed:
        return await _closed(ctx)
    if isinstance(result, dict):
        _priced(ctx, result, state)
        await ctx.finish()
        return json_response(result, headers=_headers(ctx))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    headers = {**_SSE_HEADERS, **_headers(ctx)}
    headers.pop("x-keel-cost-usd", None)  # not known yet: it comes in the final chunk's usage
    return StreamingResponse(
        sse_events(ctx, result, include_usage, state.accounting.price), media_type="text/event-stream", headers=headers
    )


def _priced(ctx: RequestContext, result: dict[str, Any], state: AppState) -> None:
    usage = result.get("usage")
    ctx.usage = usage if isinstance(usage, dict) else None
    state.accounting.price(ctx)
    if ctx.usage is not None:
        result["usage"] = {**ctx.usage, "cost": None if ctx.cost_micros is None else ctx.cost_micros / 1_000_000}


@router.post(
    "/v1/embeddings",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
        }
    },
)
async def embeddings(request: Request) -> Response:
    state: AppState = request.app.state.keel
    ctx = _ctx(request, "openai.embeddings", state)
    try:
        ctx.principal = await state.auth.principal(ctx.authorization)
        body = await read_json(request, state.config.server.max_body_bytes)
        req = validate(EmbeddingRequest, body)
        ctx.body, ctx.public_model = body, req.model
        result = await until_disconnect(request, state.pipeline.embed(ctx))
    except KeelError as exc:
        return await _fail(ctx, exc)
    except ClientClosed:
        return await _closed(ctx)
    _priced(ctx, result, state)
    await ctx.finish()
    return json_response(result, headers=_headers(ctx))


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "keel"}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """The public model names this caller may use."""
    state: AppState = request.app.state.keel
    try:
        principal = await state.auth.principal(request.headers.get("authorization"))
    except KeelError as exc:
        return error_response(exc)
    names = [n for n in state.router.names if not principal.models or n in principal.models]
    return json_response({"object": "list", "data": [_model_card(n, state.started) for n in names]})


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> Response:
    state: AppState = request.app.state.keel
    try:
        principal = await state.auth.principal(request.headers.get("authorization"))
        state.router.route(name)
        check_model(principal, name)
    except KeelError as exc:
        return error_response(exc)
    return json_response(_model_card(name, state.started))


# Served as plain Starlette routes ahead of the documented FastAPI ones (same handlers): FastAPI's per-request
# dependency solving is a measurable share of Keel's overhead on the paths every model call takes.
HOT_ROUTES = (("/v1/chat/completions", chat_completions, ["POST"]), ("/v1/embeddings", embeddings, ["POST"]))
