"""The FastAPI app with a fast path for the routes every model call takes.

``POST /v1/chat/completions``, ``/v1/embeddings`` and ``/v1/guardrails/check`` are dispatched straight from the
ASGI entry point to their handlers, past Starlette's middleware stack and router: the server-error and exception
middlewares, the request-id middleware, FastAPI's exit stack and the route matching each wrap every request and
every ``send`` in another coroutine layer, and together they cost about as much CPU as Keel's own pipeline. The
handlers are the same functions the documented FastAPI routes serve (so ``/docs`` still describes them), they do
their own error handling, and the fast path adds what the stack would have: the request id, and a logged 500 for
an unexpected exception. Middleware added with ``app.add_middleware`` does not see these routes: give the fast
path whatever a new middleware must do on them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from keel.api.http import assign_request_id, internal_error

__all__ = ["FastPathApp", "Handler"]

log = logging.getLogger("keel.app")

Handler = Callable[[Request], Awaitable[Response]]


class FastPathApp(FastAPI):
    """A FastAPI app that serves ``hot`` (path, handler, methods) routes without the middleware stack."""

    _hot: dict[tuple[str, str], Handler] = {}  # (method, path) → handler; set_hot_routes replaces it

    def set_hot_routes(self, hot: Iterable[tuple[str, Handler, list[str]]]) -> None:
        self._hot = {(method, path): fn for path, fn, methods in hot for method in methods}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (fn := self._hot.get((scope["method"], scope["path"]))) is not None:
            await self._serve_hot(fn, scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _serve_hot(self, fn: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        header = assign_request_id(scope)
        request = Request(scope, receive, send)
        try:
            response = await fn(request)
        except Exception:
            rid = scope["state"]["request_id"]
            log.exception("unhandled error", extra={"fields": {"request_id": rid, "path": scope["path"]}})
            response = internal_error(rid)
        response.raw_headers.append(header)
        await response(scope, receive, send)
