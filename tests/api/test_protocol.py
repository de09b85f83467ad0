"""keel.api.protocol: a response's writes leave in one packet, in order, and nothing is lost on close."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from helpers import ONE_MODEL, KeelServer
from keel.api.protocol import CoalescingTransport

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
