"""Test helpers: a real Keel server in a thread, and request builders."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import aiohttp
import uvicorn

from keel.api.protocol import KeelHttpProtocol
from keel.app import create_app
from keel.config import KeelConfig


class KeelServer:
    """A real Keel (uvicorn + the app) on a free loopback port, in a thread with its own event loop: uvloop, as
    ``keel serve`` runs it. ``http``: uvicorn's protocol (``"httptools"``: any ASGI server's path, no hot routes)."""

    def __init__(self, config: KeelConfig, http: Any = KeelHttpProtocol) -> None:
        self.config = config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = create_app(config)
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, loop="uvloop", http=http, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self) -> KeelServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("Keel test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


ONE_MODEL = """
  - name: smart
    provider: openai
    model: up-smart
    api_base: {fake}
    api_key: sk-upstream-test
    max_retries: 2
    retry_backoff_s: 0.01
"""


def chat_body(content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": "smart", "messages": [{"role": "user", "content": content}], **kw}


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """A stream's [(event, data)], read raw, so an error event or a missing [DONE] is visible."""
    events: list[tuple[str | None, str]] = []
    event = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            events.append((event, line[5:].strip()))
            event = None
    return events
