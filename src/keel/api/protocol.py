"""Keel's HTTP/1.1 protocol for uvicorn: httptools parsing, coalesced writes, and the model routes served without ASGI.

Two things cost latency on every model call, so ``keel serve`` runs uvicorn with :class:`KeelHttpProtocol`:

- **Layers.** An ASGI request passes uvicorn's request cycle, its proxy-headers middleware, Starlette's middleware
  stack and router and FastAPI's exit stack, and every ``send`` goes back through them. For the routes each model
  call takes (``app.state.hot_routes``: ``POST /v1/chat/completions``, ``/v1/embeddings``, ``/v1/guardrails/check``
  with no query string) the protocol calls the handler itself with a :class:`HotCycle` as its
  :class:`~keel.api.incoming.Incoming`, and writes a complete answer as one buffer. Measured against the fake
  upstream (``bench/gateway_overhead.py``), the layers were about a third of what Keel added to a request. Any
  other path, or a request uvicorn must treat specially (an upgrade, ``root_path``, ``limit_concurrency``), takes
  the ASGI route as before, and any other ASGI server serves the same handlers through their FastAPI routes.
  What the ASGI path adds that the hot path does without: the client address from ``X-Forwarded-For`` (no hot
  handler uses it) and middleware added to the app (give a new middleware's work to :class:`HotCycle` too).
- **Packets.** uvicorn writes a response's head as soon as the app sends ``http.response.start`` and the body on the
  next ``send``: two packets, and the first wakes the client (often preempting Keel on its CPU) before the body is
  there. :class:`CoalescingTransport` joins what one tick of the loop writes into one write at the end of the tick;
  streams keep their chunks, each batched the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.applications import Starlette
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import (
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from keel.api.http import ClientClosed, assign_request_id, bounded_json, internal_error

if TYPE_CHECKING:
    from keel.api.incoming import Handler
    from keel.api.state import AppState

__all__ = ["CoalescingTransport", "HotCycle", "KeelHttpProtocol"]

log = logging.getLogger("keel.app")
T = TypeVar("T")


class CoalescingTransport:
    """Wraps a transport: ``write`` is deferred to the end of the current loop tick and joined with the writes made
    before then; everything else is the wrapped transport's."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once, after whatever is pending: for a response that is complete."""
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending = []  # the scheduled flush finds nothing left
        if not self._transport.is_closing():
            self._transport.write(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HotCycle(RequestResponseCycle):
    """One request to a hot route. It is uvicorn's request cycle (body, flow control, 100-continue, keep-alive and
    pipelining work as for any request) whose task calls the handler directly instead of the ASGI app."""

    def __init__(self, handler: Handler, app: Starlette, **cycle: Any) -> None:
        super().__init__(**cycle)
        self.handler = handler
        self.app = app
        self._headers: dict[str, str] | None = None
        self._watched: asyncio.Task[Any] | None = None
        self._gone = False

    # keel.api.incoming.Incoming
    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.keel
        return state

    @property
    def request_id(self) -> str:
        rid: str = self.scope["state"]["request_id"]
        return rid

    def header(self, name: str) -> str | None:
        if self._headers is None:  # the first occurrence wins, as in Starlette
            self._headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in reversed(list(self.scope["headers"]))}
        return self._headers.get(name)

    async def json(self) -> Any:
        return await bounded_json(self.header("content-length"), self._body(), self.state.config.server.max_body_bytes)

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            message: Any = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientClosed()
            yield message["body"]
            if not message["more_body"]:
                return

    async def until_disconnect(self, aw: Awaitable[T]) -> T:
        # No watcher task: the protocol's connection_lost calls client_gone(), which cancels the awaiting task.
        task = asyncio.current_task()
        assert task is not None
        if self.disconnected:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise ClientClosed()
        self._watched = task
        try:
            return await aw
        except asyncio.CancelledError:
            if self._gone:
                task.uncancel()
                raise ClientClosed() from None
            raise
        finally:
            self._watched = None

    def client_gone(self) -> None:
        if self._watched is not None and not self._gone and not self.response_complete:
            self._gone = True
            self._watched.cancel()

    # The task
    async def run_asgi(self, app: Any) -> None:  # ``app`` is the ASGI app, which a hot route does not use
        scope: Any = self.scope  # an HTTPScope: a plain dict to Starlette
        request_id = assign_request_id(scope)
        try:
            try:
                response = await self.handler(self)
            except Exception:
                rid = scope["state"]["request_id"]
                log.exception("unhandled error", extra={"fields": {"request_id": rid, "path": scope["path"]}})
                response = internal_error(rid)
            response.raw_headers.append(request_id)
            body = getattr(response, "body", None)
            if isinstance(body, bytes):
                self._write(response, body)
            else:  # a stream: through uvicorn's ASGI send, chunk by chunk
                await response(scope, self.receive, self.send)  # type: ignore[arg-type]
        except BaseException as exc:  # as uvicorn's cycle does: log, and answer 500 if nothing was sent yet
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        finally:
            self.on_response = lambda: None

    def _write(self, response: Response, body: bytes) -> None:
        if self.disconnected:
            return
        content = [STATUS_LINE[response.status_code]]
        for headers in (self.default_headers, response.raw_headers):
            for name, value in headers:
                if HEADER_VALUE_RE.search(value):
                    raise RuntimeError(f"Invalid HTTP header value for {name!r}.")
                content += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.response_started = self.response_complete = True
        self.waiting_for_100_continue = False
        self.transport.write_now(b"".join(content))  # type: ignore[attr-defined]
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


def _hot_routes(app: Any) -> tuple[Starlette | None, Mapping[tuple[bytes, bytes], Handler]]:
    """The Starlette app under uvicorn's wrappers, and its ``state.hot_routes``: {(method, path): handler}."""
    while app is not None and not isinstance(app, Starlette):
        app = getattr(app, "app", None)
    if app is None:
        return None, {}
    return app, getattr(app.state, "hot_routes", None) or {}


class KeelHttpProtocol(HttpToolsProtocol):
    """``uvicorn.run(http=KeelHttpProtocol)``: httptools parsing, coalesced writes, hot routes served directly."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._starlette, self._hot = _hot_routes(self.app)

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        handler = self._hot.get((method, self.url)) if self._hot else None
        if handler is None or self.root_path or self.limit_concurrency is not None or self.parser.should_upgrade():
            super().on_headers_complete()
            return
        assert self._starlette is not None
        scope = self.scope
        scope["method"] = method.decode("ascii")
        http_version = self.parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["path"] = self.url.decode("ascii")
        scope["raw_path"] = self.url
        scope["query_string"] = b""
        existing = self.cycle
        self.cycle = HotCycle(
            handler,
            self._starlette,
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined behind a response still being written
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if isinstance(self.cycle, HotCycle):
            self.cycle.client_gone()
