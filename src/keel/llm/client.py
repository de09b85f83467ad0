"""The upstream HTTP/1.1 client: a keep-alive connection pool over asyncio protocols, parsed by httptools (llhttp).

Why not aiohttp: a model call is one POST with a JSON body, answered with JSON or an SSE stream, to a handful of
origins. aiohttp's general client (cookies, redirects, proxies, multipart, tracing, its own timeout machinery)
spends about 175 µs of CPU per such request; this one about 40 µs. At gateway rates that is a quarter of Keel's
CPU per request, and on a busy event loop every request's latency.

What it does: one pool per worker, connections per origin (``scheme://host:port``) kept alive for
``keepalive_s`` and reused last-in first-out; at most ``limit`` requests in flight (a request past it waits for a
slot); TLS with the system's trust store (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured) and SNI; a connect
timeout; Content-Length, chunked and read-until-close bodies; gzip/deflate bodies decoded (Keel never asks for
them); reading paused while a stream's consumer lags (flow control). A connection goes back to the pool only when
its response was read to the end and the server allows keep-alive; a request cancelled or abandoned mid-response
closes its connection, which is what tells the upstream to stop generating. A request that fails on a pooled
connection before a single response byte arrived (the server closed it while idle) is sent once more on a new one.

Deadlines other than connecting belong to the router (it cancels); errors here are ``OSError``s
(``ConnectionError`` for a connection lost mid-response) and ``HttpParserError``s, which ``keel.llm.http``
classifies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectionLost", "Response", "UpstreamClient"]

_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses until the consumer catches up
_LOW_WATER = 64 * 1024


class ConnectionLost(ConnectionError):
    """The connection closed before the response was complete."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, a fresh parser per response."""

    def __init__(self, pool: deque[_Connection]) -> None:
        self._pool = pool  # the origin's idle list, left when the connection closes while idle
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._response: Response | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None:
            self._response.lost(exc)
        elif self in self._pool:
            self._pool.remove(self)

    # -- used by the pool ----------------------------------------------------------------------------------------

    def send(self, response: Response, head: bytes, body: bytes) -> None:
        self._response = response
        assert self.transport is not None
        self.transport.writelines((head, body))  # one send; the transport buffers what the socket does not take

    def done(self, reusable: bool) -> None:
        """The response is finished with; back to the idle list when ``reusable``, closed otherwise."""
        self._response = None
        if reusable and not self.closed:
            self.idle_since = time.monotonic()
            self._pool.append(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose head has arrived: ``status``, ``headers`` (names lower-cased, repeats joined with
    ``", "``), and the body through :meth:`read` or :meth:`iter_chunks`. Call :meth:`release` when done (the
    pool's context manager does)."""

    def __init__(self, conn: _Connection, release_slot: Callable[[], None]) -> None:
        self._conn = conn
        self._release_slot = release_slot
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._until_close = False
        self._keep_alive = False
        self._received_any = False
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self._decoder: Any = None
        self._released = False

    # -- httptools callbacks -------------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = {}
            return
        framed = "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._until_close = not framed and self.status not in (204, 304)
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = _Deflate()
        elif encoding not in ("", "identity"):
            self._fail(ConnectionError(f"the response body is encoded as {encoding!r}, which Keel cannot decode"))
            return
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(ConnectionError(f"the response body does not decode: {exc}"))
                return
        if body:
            self._chunks.append(body)
            self._buffered += len(body)
            if self._buffered > _HIGH_WATER and not self._paused:
                self._paused = True
                self._conn.pause_reading()
            self._notify()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return  # the parser goes on with the final response
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is done
        self._complete = True
        self._notify()

    # -- fed by the connection -----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self._conn.close()

    def lost(self, exc: Exception | None) -> None:
        if self._complete or self._error is not None:
            return
        if self._until_close and self._head.done():
            self.on_message_complete()  # a body without a length ends where the connection does
            return
        self._fail(ConnectionLost("the upstream closed the connection mid-response") if exc is None else exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: a request abandoned meanwhile must not log "never retrieved"
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- public --------------------------------------------------------------------------------------------------

    @property
    def received_any(self) -> bool:
        return self._received_any

    async def head(self) -> None:
        await self._head

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, in the pieces it arrives in; raises ``ConnectionError`` (or ``HttpParserError``) when it breaks
        before its end."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _LOW_WATER:
                    self._paused = False
                    self._conn.resume_reading()
                yield chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back (read to the end, keep-alive) or close it (anything else), and free the slot."""
        if self._released:
            return
        self._released = True
        reusable = self._complete and self._keep_alive and self._error is None and not self._until_close
        self._conn.done(reusable)
        self._release_slot()


class _Deflate:
    """``Content-Encoding: deflate`` is zlib-wrapped by the standard, raw by some servers: take either."""

    def __init__(self) -> None:
        self._inner: Any = None
        self._first = b""

    def decompress(self, data: bytes) -> bytes:
        if self._inner is None:
            self._first += data
            if len(self._first) < 2:
                return b""
            cmf, flg = self._first[0], self._first[1]
            wrapped = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._first = self._first, b""
        return bytes(self._inner.decompress(data))

    def flush(self) -> bytes:
        return bytes(self._inner.flush()) if self._inner is not None else b""


class _Origin:
    __slots__ = ("host", "idle", "port", "prefix", "ssl")

    def __init__(self, scheme: str, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_context if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        authority = f"[{host}]" if ":" in host else host
        self.prefix = f"Host: {authority}{'' if port == default else f':{port}'}\r\n".encode("latin-1")
        self.idle: deque[_Connection] = deque()


class UpstreamClient:
    """The worker's pool of upstream connections. ``limit``: requests in flight at once; ``keepalive_s``: how long
    an idle connection is kept; ``ssl_context``: for ``https`` (default: the system's trust store)."""

    def __init__(
        self, *, limit: int = 512, keepalive_s: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._origins: dict[str, _Origin] = {}
        self._closed = False

    def _origin(self, scheme: str, netloc: str) -> _Origin:
        key = f"{scheme}://{netloc}"
        origin = self._origins.get(key)
        if origin is None:
            if scheme not in ("http", "https"):
                raise ValueError(f"unsupported URL scheme {scheme!r}")
            parts = urlsplit(key)
            if not parts.hostname:
                raise ValueError(f"no host in {key!r}")
            port = parts.port or (443 if scheme == "https" else 80)
            if scheme == "https" and self._ssl is None:
                self._ssl = ssl.create_default_context()
            origin = self._origins[key] = _Origin(scheme, parts.hostname, port, self._ssl)
        return origin

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        connect_timeout: float | None = None,
    ) -> Response:
        """Send the request and return once the response's head has arrived. The caller must ``release()`` it."""
        if self._closed:
            raise RuntimeError("the upstream client is closed")
        scheme, netloc, path, query, _ = urlsplit(url)
        origin = self._origin(scheme, netloc)
        target = (path or "/") + (f"?{query}" if query else "")
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), origin.prefix]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1"))
        head = b"".join(lines)
        await self._slots.acquire()
        try:
            for _attempt in range(2):
                conn, reused = await self._connection(origin, connect_timeout)
                response = Response(conn, self._slots.release)
                try:
                    conn.send(response, head, body)
                    await response.head()
                except BaseException as exc:
                    conn.done(reusable=False)
                    # A kept-alive connection the server had closed while idle: nothing reached it, try a new one.
                    if reused and isinstance(exc, ConnectionError) and not response.received_any:
                        continue
                    raise
                return response
            raise AssertionError("unreachable")
        except BaseException:
            self._slots.release()
            raise

    async def _connection(self, origin: _Origin, connect_timeout: float | None) -> tuple[_Connection, bool]:
        """A live idle connection to ``origin`` (most recently used first), or a new one."""
        idle = origin.idle
        now = time.monotonic()
        while idle and now - idle[0].idle_since >= self._keepalive_s:  # the oldest: unused since a past burst
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            transport, conn = await loop.create_connection(
                lambda: _Connection(idle),
                origin.host,
                origin.port,
                ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl is not None else None,
            )
        conn.transport = transport  # uvloop may call connection_made only on its next loop tick
        return conn, False

    def idle_connections(self) -> int:
        return sum(len(o.idle) for o in self._origins.values())

    async def aclose(self) -> None:
        """Close the idle connections; requests still running close theirs when released."""
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
        await asyncio.sleep(0)  # let the transports run their close callbacks
