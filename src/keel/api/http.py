"""HTTP helpers shared by every route: bounded JSON body reading, OpenAI-style error responses, request ids,
and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import AsyncIterable, Awaitable
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import InvalidRequest, KeelError

__all__ = [
    "ClientClosed",
    "RequestIdMiddleware",
    "assign_request_id",
    "bounded_json",
    "error_response",
    "internal_error",
    "json_response",
    "read_json",
    "until_disconnect",
]

T = TypeVar("T")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Request ids: a random per-process prefix and a counter. Unique across workers and restarts, and far cheaper
# than fresh randomness per request; they identify requests, they are not secrets.
_ID_PREFIX = "req_" + os.urandom(6).hex()
_ID_COUNTER = itertools.count()


class ClientClosed(Exception):
    """The client disconnected before the answer was ready; the work was cancelled."""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def error_response(error: KeelError, headers: dict[str, str] | None = None) -> Response:
    return json_response(error.to_body(), error.status, {**(headers or {}), **error.response_headers()})


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body parsed as JSON; 413 past ``max_bytes`` (checked while reading, not after), 400 when malformed."""
    return await bounded_json(request.headers.get("content-length"), request.stream(), max_bytes)


async def bounded_json(declared: str | None, chunks: AsyncIterable[bytes], max_bytes: int) -> Any:
    """A body read from ``chunks`` and parsed as JSON: 413 when the ``declared`` Content-Length or the bytes read
    pass ``max_bytes`` (checked while reading, not after), 400 when empty or malformed."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    parts = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(chunk)
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON with Content-Type: application/json."
        ) from None


def internal_error(request_id: str) -> Response:
    """The 500 for an unexpected exception: no detail for the client, only the id that finds it in the logs."""
    return error_response(KeelError(f"Internal error; the request id {request_id} identifies it in the server logs."))


def _too_large(max_bytes: int) -> InvalidRequest:
    return InvalidRequest(
        f"The request body is larger than {max_bytes} bytes (server.max_body_bytes).",
        code="request_too_large",
        status=413,
    )


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw``, cancelling it if the client disconnects first (then raise :class:`ClientClosed`).

    The body must already have been read. Cancelling here is what stops an orphaned upstream call.
    """
    current = asyncio.current_task()
    assert current is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                current.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await aw
    except asyncio.CancelledError:
        if disconnected:
            current.uncancel()
            raise ClientClosed() from None
        raise
    finally:
        watcher.cancel()


def assign_request_id(scope: Scope) -> tuple[bytes, bytes]:
    """Put the request's id in ``scope["state"]`` (the client's ``X-Request-ID`` when it is sane, else a new
    one) and return the response header that echoes it."""
    rid = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SAFE_ID.match(candidate):
                rid = candidate
            break
    if rid is None:
        rid = f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
    scope.setdefault("state", {})["request_id"] = rid
    return (b"x-request-id", rid.encode("latin-1"))


class RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-ID`` when it is sane) and echo it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = assign_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
