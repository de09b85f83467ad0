"""A bare TCP relay: ``python bench/tcp_relay.py LISTEN_PORT TARGET_PORT`` forwards every connection to
``127.0.0.1:TARGET_PORT`` byte for byte (uvloop, asyncio protocols, no parsing, no copies beyond the kernel's).

It is the floor for any proxy in ``gateway_overhead.py``: the two extra hops (and process wake-ups) a gateway
cannot avoid, with none of the HTTP or the pipeline. What Keel adds beyond what this adds is Keel's own cost.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what arrives is written to the peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Pipe):
    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream_transport, upstream = await loop.create_connection(_Pipe, "127.0.0.1", self.target)
        upstream.transport, upstream.peer, self.peer = upstream_transport, self, upstream
        for data in self.pending:
            upstream_transport.write(data)
        self.pending.clear()
        assert self.transport is not None
        self.transport.resume_reading()


async def main(listen: int, target: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(target), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
