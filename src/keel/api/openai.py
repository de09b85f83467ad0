"""The OpenAI-compatible surface: ``/v1/chat/completions``, ``/v1/models``, ``/v1/embeddings``. Any OpenAI SDK
works against Keel by changing ``base_url``.

A chat request may name an app with the ``x-keel-app`` header: that app's guardrails then apply (input checks on
the last user message, output checks on the answer or the stream; see :mod:`keel.api.guarded`). Without the
header, or when no app has guardrails, the request takes the plain path with no guardrail work at all."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from keel.api.context import SSE_HEADERS, closed, fail, keel_headers, new_context, price_result
from keel.api.guarded import app_guards, check_messages, guard_answer, request_scope
from keel.api.http import ClientClosed, error_response, json_response
from keel.api.incoming import AsgiIncoming, Handler, Incoming
from keel.api.schemas import ChatCompletionRequest, EmbeddingRequest, validate
from keel.api.state import AppState
from keel.api.streaming import sse_events
from keel.errors import KeelError
from keel.pipeline.auth import check_model

__all__ = ["HOT_ROUTES", "router"]

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    name="chat_completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
        }
    },
)
async def chat_completions_route(request: Request) -> Response:
    return await chat_completions(AsgiIncoming(request))


async def chat_completions(request: Incoming) -> Response:
    state = request.state
    ctx = new_context(request, "openai.chat")
    try:
        ctx.principal = await state.auth.principal(ctx.authorization)
        body = await request.json()
        req = validate(ChatCompletionRequest, body)
        ctx.body, ctx.public_model, ctx.stream = body, req.model, bool(req.stream)
        app = request.header("x-keel-app") if state.guards else None  # no guardrails anywhere: no work
        guards = app_guards(state, app) if app else None
        if guards is not None and guards.input is not None:
            await check_messages(guards, ctx, state.embedder.embed)
        result = await request.until_disconnect(state.pipeline.chat(ctx))
        if guards is not None and guards.output is not None:
            result = await request.until_disconnect(guard_answer(state, guards, ctx, result, request_scope(ctx.body)))
    except KeelError as exc:
        return await fail(ctx, exc)
    except ClientClosed:
        return await closed(ctx)
    if isinstance(result, dict):
        price_result(ctx, result, state)
        await ctx.finish()
        return json_response(result, headers=keel_headers(ctx))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    headers = {**SSE_HEADERS, **keel_headers(ctx)}
    headers.pop("x-keel-cost-usd", None)  # not known yet: it comes in the final chunk's usage
    return StreamingResponse(
        sse_events(ctx, result, include_usage, state.accounting.price), media_type="text/event-stream", headers=headers
    )


@router.post(
    "/v1/embeddings",
    name="embeddings",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
        }
    },
)
async def embeddings_route(request: Request) -> Response:
    return await embeddings(AsgiIncoming(request))


async def embeddings(request: Incoming) -> Response:
    state = request.state
    ctx = new_context(request, "openai.embeddings")
    try:
        ctx.principal = await state.auth.principal(ctx.authorization)
        body = await request.json()
        req = validate(EmbeddingRequest, body)
        ctx.body, ctx.public_model = body, req.model
        result = await request.until_disconnect(state.pipeline.embed(ctx))
    except KeelError as exc:
        return await fail(ctx, exc)
    except ClientClosed:
        return await closed(ctx)
    price_result(ctx, result, state)
    await ctx.finish()
    return json_response(result, headers=keel_headers(ctx))


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


# POST routes that keel.api.protocol serves without ASGI; the FastAPI routes above serve them on other servers.
HOT_ROUTES: dict[str, Handler] = {"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings}
