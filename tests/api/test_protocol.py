"""keel.api.protocol: a response's writes leave in one packet, in order, and nothing is lost on close; the hot
routes, served without ASGI, keep HTTP/1.1's semantics and answer as the ASGI routes do."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from conftest import config_text
from helpers import ONE_MODEL, KeelServer, chat_body, read_sse
from keel.api.protocol import CoalescingTransport
from keel.config import parse_config
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def test_writes_in_one_tick_go_out_as_one_and_later_ones_separately() -> None:
    inner = RecordingTransport()
    t = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert inner.writes == []  # held until the end of the tick
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"chunk")
    await asyncio.sleep(0)
    assert inner.writes[-1] == b"chunk" and len(inner.writes) == 2
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the wrapped transport's


async def test_close_flushes_first_and_abort_drops() -> None:
    inner = RecordingTransport()
    t = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"last words")
    t.close()
    assert inner.writes == [b"last words"] and inner.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert inner.writes == [b"last words"]

    inner = RecordingTransport()
    t = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"never sent")
    t.abort()
    await asyncio.sleep(0)
    assert inner.writes == [] and inner.aborted


def test_a_json_answer_arrives_whole_in_the_first_read(keel: Keel) -> None:
    """Status line, headers and body in one segment: a client blocked in recv() wakes once, with everything."""
    server = keel(ONE_MODEL)
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for _ in range(3):  # and again on the same keep-alive connection
            sock.sendall(request)
            first = sock.recv(1 << 16)
            head, _, body = first.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            assert head.startswith(b"HTTP/1.1 200") and len(body) == length
            assert json.loads(body)["choices"][0]["message"]["content"] == "Echo: hi"


# -- the hot routes, served by the protocol without ASGI --------------------------------------------------------


def _raw(server: KeelServer, data: bytes, until: int = 1, timeout: float = 10) -> list[tuple[bytes, bytes]]:
    """Send raw bytes on one connection and read ``until`` responses: [(head, body)] (Content-Length bodies)."""
    host, port = server.url.removeprefix("http://").split(":")
    out: list[tuple[bytes, bytes]] = []
    buf = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        while len(out) < until:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(1 << 16)
                assert chunk, f"connection closed after {len(out)} responses"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 100"):
                out.append((head, b""))
                continue
            length = int(_header(head, b"content-length") or 0)
            while len(buf) < length:
                chunk = sock.recv(1 << 16)
                assert chunk, "connection closed mid-body"
                buf += chunk
            out.append((head, buf[:length]))
            buf = buf[length:]
    return out


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _post(payload: bytes, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def _chat(content: str, model: str = "smart") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


def test_pipelined_requests_are_answered_in_order(keel: Keel) -> None:
    """Two requests in one segment: the second waits for the first's response, then both arrive, in order."""
    server = keel(ONE_MODEL)
    [(h1, b1), (h2, b2)] = _raw(server, _post(_chat("one")) + _post(_chat("two")), until=2)
    assert h1.startswith(b"HTTP/1.1 200") and h2.startswith(b"HTTP/1.1 200")
    assert json.loads(b1)["choices"][0]["message"]["content"] == "Echo: one"
    assert json.loads(b2)["choices"][0]["message"]["content"] == "Echo: two"
    assert _header(h1, b"x-request-id") != _header(h2, b"x-request-id")


def test_a_body_sent_in_pieces_after_100_continue(keel: Keel) -> None:
    server = keel(ONE_MODEL)
    host, port = server.url.removeprefix("http://").split(":")
    payload = _chat("slowly")
    head = _post(payload, extra="Expect: 100-continue\r\n")[: -len(payload)]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 100 Continue")
        for i in range(0, len(payload), 10):
            sock.sendall(payload[i : i + 10])
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"] == "Echo: slowly"


def test_bad_requests_get_openai_errors_and_the_connection_keeps_serving(keel: Keel) -> None:
    """Oversized, malformed and empty bodies, and model names no header can carry, each get a JSON error with
    its status; the same connection then serves a normal request."""
    server = keel(ONE_MODEL, extra="server: {max_body_bytes: 2000}")
    big = _chat("x" * 3000)
    cases = [
        (_post(big), 413, "request_too_large"),
        (_post(b'{"model": "smart", "messages": ['), 400, None),
        (_post(b""), 400, None),
        (_post(_chat("hi", model="smart\r\nx-injected: 1")), 404, "model_not_found"),
        (_post(_chat("hi", model="модель")), 404, "model_not_found"),
    ]
    data = b"".join(request for request, _, _ in cases) + _post(_chat("after"))
    responses = _raw(server, data, until=len(cases) + 1)
    for (head, body), (_, status, code) in zip(responses, cases, strict=False):
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        assert _header(head, b"x-injected") is None and _header(head, b"x-request-id")
        error = json.loads(body)["error"]
        assert error["message"] and (code is None or error["code"] == code)
    head, body = responses[-1]
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["choices"][0]["message"]["content"] == "Echo: after"


def test_http_1_0_gets_its_answer_and_the_connection_closes(keel: Keel) -> None:
    server = keel(ONE_MODEL)
    host, port = server.url.removeprefix("http://").split(":")
    payload = _chat("old client")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_post(payload).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        answer = b""
        while chunk := sock.recv(1 << 16):  # the server closes: the loop ends
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and _header(head, b"connection") == b"close"
    assert json.loads(body)["choices"][0]["message"]["content"] == "Echo: old client"


async def test_the_asgi_routes_serve_the_same_api(fake: FakeUpstreamThread, tmp_path: Path) -> None:
    """Under plain uvicorn (any ASGI server: no hot routes) and with a query string (the ASGI path under
    ``keel serve``), the FastAPI routes answer as the hot path does: answers, streams, errors, request ids."""
    config = parse_config(
        f"logging: {{level: warning}}\ndatabase_url: sqlite+aiosqlite:///{tmp_path}/k.db\nmodels:\n"
        + config_text(fake.base_url, ONE_MODEL),
        env={},
    )
    plain = KeelServer(config, http="httptools").start()
    hot = KeelServer(config).start()
    try:
        for url in (plain.url + "/v1/chat/completions", hot.url + "/v1/chat/completions?via=asgi"):
            async with aiohttp.ClientSession() as s:
                async with s.post(url, json=chat_body("hi"), headers={"X-Request-ID": "req-1"}) as resp:
                    assert resp.status == 200 and resp.headers["x-request-id"] == "req-1"
                    assert resp.headers["x-keel-model"] == "smart"
                    assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: hi"
                async with s.post(url, json=chat_body("a b", stream=True)) as resp:
                    events = await read_sse(resp)
                    assert resp.status == 200 and events[-1] == (None, "[DONE]")
                async with s.post(url, json=chat_body(model="nope")) as resp:
                    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
                async with s.post(url.replace("chat/completions", "embeddings"), json={"model": "smart"}) as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["param"] == "input"
    finally:
        plain.stop()
        hot.stop()
