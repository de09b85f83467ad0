"""What the model routes need from an HTTP request, so that one handler serves two transports.

``keel serve`` hands ``POST /v1/chat/completions``, ``/v1/embeddings`` and ``/v1/guardrails/check`` straight from its
HTTP protocol to the handlers (:mod:`keel.api.protocol`), past ASGI, Starlette and FastAPI; any other ASGI server
reaches the same handlers through their FastAPI routes, with :class:`AsgiIncoming` around Starlette's request.
Both give the handler the app state, the request id, headers, the body as bounded JSON, and cancellation when the
client goes away.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from keel.api.http import read_json, until_disconnect

if TYPE_CHECKING:
    from keel.api.state import AppState

__all__ = ["AsgiIncoming", "Handler", "Incoming"]

T = TypeVar("T")


class Incoming(Protocol):
    """A request as a model route handler sees it."""

    @property
    def state(self) -> AppState: ...

    @property
    def request_id(self) -> str: ...

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case), or None."""
        ...

    async def json(self) -> Any:
        """The body parsed as JSON, at most ``server.max_body_bytes`` (413 past it, 400 when malformed); raises
        :class:`~keel.api.http.ClientClosed` if the client leaves while sending it."""
        ...

    async def until_disconnect(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` after the body was read, cancelling it if the client disconnects first (then raise
        :class:`~keel.api.http.ClientClosed`): what stops an orphaned upstream call."""
        ...


Handler = Callable[[Incoming], Awaitable[Response]]


class AsgiIncoming:
    """:class:`Incoming` over Starlette's request (any ASGI server; the request id middleware has run)."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def state(self) -> AppState:
        state: AppState = self._request.app.state.keel
        return state

    @property
    def request_id(self) -> str:
        rid: str = self._request.scope["state"]["request_id"]
        return rid

    def header(self, name: str) -> str | None:
        return self._request.headers.get(name)

    async def json(self) -> Any:
        return await read_json(self._request, self.state.config.server.max_body_bytes)

    async def until_disconnect(self, aw: Awaitable[T]) -> T:
        return await until_disconnect(self._request, aw)
