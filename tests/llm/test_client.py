"""The upstream HTTP client against raw scripted servers, on both event loops Keel runs on (uvloop for
``keel serve``, asyncio's own elsewhere): keep-alive reuse, every body framing, content encodings, stale
connections, cut and malformed responses, cancellation, flow control, the in-flight limit, TLS and redirects."""

from __future__ import annotations

import asyncio
import gzip
import re
import ssl
import subprocess
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from httptools import HttpParserError

from keel.errors import ProviderError, UpstreamError
from keel.llm.client import ConnectionLost, UpstreamClient
from keel.llm.http import read_json, upstream_request

Writer = asyncio.StreamWriter
Handler = Callable[["RawServer", asyncio.StreamReader, Writer, int], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Runs a coroutine on a fresh loop of the kind the test is parametrized with."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner.run


class RawServer:
    """A loopback server whose ``handler(server, reader, writer, n)`` scripts each connection (``n``: its index)."""

    def __init__(self, handler: Handler, ssl: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        try:
            await self.handler(self, reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and body), or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answer(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def keep_answering(response: bytes) -> Handler:
    """Answer every request on the connection with ``response``."""

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(response)

    return handler


def answer_once(response: bytes) -> Handler:
    """Read one request, write ``response`` and close the connection."""

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await server.read_request(reader)
        writer.write(response)
        await writer.drain()

    return handler


async def fetch(client: UpstreamClient, url: str, body: bytes = b"{}") -> tuple[int, dict[str, str], bytes]:
    resp = await client.request("POST", url, headers={"Content-Type": "application/json"}, body=body)
    try:
        return resp.status, resp.headers, await resp.read()
    finally:
        resp.release()


# -- keep-alive and framing -------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request(run: Any) -> None:
    async def main() -> None:
        async with RawServer(keep_answering(answer(b'{"ok": true}'))) as server:
            client = UpstreamClient()
            for i in range(5):
                status, headers, body = await fetch(client, server.url + "?x=1", b'{"n": %d}' % i)
                assert (status, body, headers["content-length"]) == (200, b'{"ok": true}', "12")
            assert server.connections == 1 and client.idle_connections() == 1
            head, _, sent = server.requests[4].partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /v1/chat?x=1 HTTP/1.1"
            assert f"Host: 127.0.0.1:{server.port}".encode() in lines and b"Content-Length: 8" in lines
            assert not any(line.lower().startswith(b"accept-encoding") for line in lines)  # bodies come plain
            assert sent == b'{"n": 4}'
            await client.aclose()

    run(main())


def test_chunked_and_until_close_bodies(run: Any) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end"

    async def main() -> None:
        async with RawServer(keep_answering(chunked)) as server:
            client = UpstreamClient()
            assert (await fetch(client, server.url))[2] == b"hello world"
            assert (await fetch(client, server.url))[2] == b"hello world"
            assert server.connections == 1

        async with RawServer(answer_once(until_close)) as server:
            assert (await fetch(client, server.url))[2] == b"to the end"
            assert (await fetch(client, server.url))[2] == b"to the end"
            assert server.connections == 2  # a body that ends with its connection leaves nothing to reuse
        await client.aclose()

    run(main())


def test_connection_close_is_not_pooled_and_interim_answers_are_skipped(run: Any) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"done", "Connection: close")

    async def main() -> None:
        async with RawServer(keep_answering(interim)) as server:
            client = UpstreamClient()
            for _ in range(2):
                status, headers, body = await fetch(client, server.url)
                assert (status, body, headers["connection"]) == (200, b"done", "close")
            assert server.connections == 2 and client.idle_connections() == 0
            await client.aclose()

    run(main())


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send it
    ],
)
def test_encoded_bodies_are_decoded(run: Any, encoding: str, encode: Callable[[bytes], bytes]) -> None:
    text = b'{"choices": []}' * 200

    async def main() -> None:
        async with RawServer(keep_answering(answer(encode(text), f"Content-Encoding: {encoding}"))) as s:
            client = UpstreamClient()
            assert (await fetch(client, s.url))[2] == text
            assert (await fetch(client, s.url))[2] == text
            await client.aclose()

    run(main())


def test_an_encoding_it_cannot_decode_is_an_error(run: Any) -> None:
    async def main() -> None:
        async with RawServer(keep_answering(answer(b"xx", "Content-Encoding: br"))) as server:
            client = UpstreamClient()
            with pytest.raises(ConnectionError, match="'br'"):
                await fetch(client, server.url)
            await client.aclose()

    run(main())


# -- broken connections -----------------------------------------------------------------------------------------


def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(run: Any) -> None:
    """The server closes a kept-alive connection as the next request arrives (its idle timeout racing ours):
    nothing came back, so the request goes out again on a new connection."""

    async def main() -> None:
        async def handler(srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await srv.read_request(reader)
            writer.write(answer(b"first" if n == 0 else b"again"))
            await writer.drain()
            if n == 0:
                await srv.read_request(reader)  # then hang up without a word

            else:
                while await srv.read_request(reader) is not None:
                    writer.write(answer(b"again"))

        async with RawServer(handler) as server:
            client = UpstreamClient()
            assert (await fetch(client, server.url))[2] == b"first"
            assert (await fetch(client, server.url))[2] == b"again"
            assert server.connections == 2 and len(server.requests) == 3
            await client.aclose()

    run(main())


def test_a_new_connection_closed_without_an_answer_is_an_error(run: Any) -> None:
    async def main() -> None:
        async def hang_up(srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await srv.read_request(reader)

        async with RawServer(hang_up) as server:
            client = UpstreamClient()
            with pytest.raises(ConnectionError):
                await fetch(client, server.url)
            assert server.connections == 1  # not retried: it was not a kept-alive connection
            await client.aclose()

    run(main())


def test_a_body_cut_short_raises_and_maps_to_an_upstream_error(run: Any) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"choices": [' + b" " * 20

    async def main() -> None:
        async with RawServer(answer_once(cut)) as server:
            client = UpstreamClient()
            with pytest.raises(ConnectionLost):
                await fetch(client, server.url)
            with pytest.raises(UpstreamError, match="broke the response body"):
                async with upstream_request(
                    client, "POST", server.url, deployment="d", json_body={}, headers={}, connect_timeout=1
                ) as resp:
                    await read_json(resp, "d")
            assert client.idle_connections() == 0
            await client.aclose()

    run(main())


def test_a_malformed_response_is_a_parser_error(run: Any) -> None:
    async def main() -> None:
        async with RawServer(keep_answering(b"SMTP ready\r\n\r\n")) as server:
            client = UpstreamClient()
            with pytest.raises(HttpParserError):
                await fetch(client, server.url)
            with pytest.raises(UpstreamError, match="malformed HTTP response"):
                async with upstream_request(
                    client, "POST", server.url, deployment="d", json_body={}, headers={}, connect_timeout=1
                ):
                    pass
            await client.aclose()

    run(main())


def test_an_unreachable_origin_and_a_bad_header_are_errors(run: Any) -> None:
    async def main() -> None:
        client = UpstreamClient()
        with pytest.raises(UpstreamError, match="unreachable"):
            async with upstream_request(
                client, "POST", "http://127.0.0.1:9/v1", deployment="d", json_body={}, headers={}, connect_timeout=1
            ):
                pass
        with pytest.raises(ValueError, match="line break"):
            await client.request("POST", "http://127.0.0.1:9/", headers={"X-A": "b\r\nX-Evil: 1"}, body=b"")
        await client.aclose()

    run(main())


def test_redirects_are_reported_not_followed(run: Any) -> None:
    moved = b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://elsewhere.example/v1\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with RawServer(keep_answering(moved)) as server:
            client = UpstreamClient()
            with pytest.raises(ProviderError, match=re.escape("redirecting to https://elsewhere.example/v1")) as exc:
                async with upstream_request(
                    client, "POST", server.url, deployment="d", json_body={}, headers={}, connect_timeout=1
                ):
                    pass
            assert exc.value.code == "upstream_redirect" and not exc.value.retryable and exc.value.status == 502
            assert len(server.requests) == 1
            await client.aclose()

    run(main())


# -- cancellation, flow control, limits -------------------------------------------------------------------------


def test_cancelling_a_stream_closes_its_connection(run: Any) -> None:
    async def main() -> None:
        upstream_saw_close = asyncio.Event()

        async def slow_stream(srv: RawServer, reader: asyncio.StreamReader, writer: Writer, n: int) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):
                writer.write(b"6\r\ndata: \r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
                if reader.at_eof() or await _closed(reader):
                    upstream_saw_close.set()
                    return

        async with RawServer(slow_stream) as server:
            client = UpstreamClient()
            got_one = asyncio.Event()

            async def consume() -> None:
                resp = await client.request("POST", server.url, headers={}, body=b"{}")
                try:
                    async for _ in resp.iter_chunks():
                        got_one.set()
                finally:
                    resp.release()

            task = asyncio.create_task(consume())
            await got_one.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.wait_for(upstream_saw_close.wait(), 2)
            assert client.idle_connections() == 0
            await client.aclose()

    run(main())


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.001) == b""
    except TimeoutError:
        return False


def test_a_slow_consumer_pauses_reading(run: Any) -> None:
    """4 MB arrive while nobody reads: the client holds about its high-water mark, the rest waits in the
    kernel and on the server, and every byte still arrives in order."""
    body = bytes(range(256)) * (4 * 4096)

    async def main() -> None:
        async with RawServer(keep_answering(answer(body))) as server:
            client = UpstreamClient()
            resp = await client.request("POST", server.url, headers={}, body=b"{}")
            await asyncio.sleep(0.3)
            assert resp._buffered < 1024 * 1024, resp._buffered
            assert await resp.read() == body
            resp.release()
            assert client.idle_connections() == 1
            await client.aclose()

    run(main())


def test_requests_past_the_limit_wait_for_a_slot(run: Any) -> None:
    async def main() -> None:
        open_now = peak = 0

        async def slow(srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            nonlocal open_now, peak
            while await srv.read_request(reader) is not None:
                open_now += 1
                peak = max(peak, open_now)
                await asyncio.sleep(0.05)
                open_now -= 1
                writer.write(answer(b"ok"))

        async with RawServer(slow) as server:
            client = UpstreamClient(limit=2)
            results = await asyncio.gather(*(fetch(client, server.url) for _ in range(6)))
            assert [r[2] for r in results] == [b"ok"] * 6
            assert peak == 2 and server.connections == 2
            await client.aclose()

    run(main())


# -- TLS --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost``, made by the openssl command line."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_with_sni_and_verification(run: Any, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]

    async def main() -> None:
        server = RawServer(keep_answering(answer(b'{"secure": true}')), ssl=server_ctx)
        await server.__aenter__()
        url = f"https://localhost:{server.port}/v1/chat"
        trusting = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            assert await fetch(trusting, url) == (200, {"content-length": "16"}, b'{"secure": true}')
        assert names == ["localhost"] and trusting.idle_connections() == 1  # one handshake, kept alive
        system_store = UpstreamClient()  # the system's trust store does not know this certificate
        with pytest.raises(UpstreamError, match=r"unreachable.*certificate verify failed"):
            async with upstream_request(
                system_store, "POST", url, deployment="d", json_body={}, headers={}, connect_timeout=2
            ):
                pass
        await trusting.aclose()
        await system_store.aclose()
        await server.__aexit__()

    run(main())


def test_connections_idle_past_keepalive_are_closed(run: Any) -> None:
    """A burst opens several connections; once they have idled past ``keepalive_s`` the next request closes
    them (oldest first) instead of keeping them open for ever."""

    async def main() -> None:
        async def slow(srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while await srv.read_request(reader) is not None:
                await asyncio.sleep(0.05)
                writer.write(answer(b"ok"))

        async with RawServer(slow) as server:
            client = UpstreamClient(keepalive_s=0.2)
            await asyncio.gather(*(fetch(client, server.url) for _ in range(3)))
            assert client.idle_connections() == 3
            await fetch(client, server.url)
            assert client.idle_connections() == 3  # reused one, within keep-alive
            await asyncio.sleep(0.3)
            await fetch(client, server.url)
            assert client.idle_connections() == 1 and server.connections == 4  # all three expired; a new one
            await client.aclose()

    run(main())
