"""Where a request's time goes inside Keel: timestamps at each step of a non-streaming chat request.

``.venv/bin/python bench/request_timeline.py [--concurrency 1] [--requests 600]`` starts the fake upstream
(answering in exactly ``--delay-ms``) and a ``keel serve`` whose hot path is wrapped with timestamps, sends the same
load straight to the fake and through Keel, and prints Keel's added p50 and, per step, p50/p90/p99 in ms:

- ``parsed -> app``: the protocol has the whole request; the hot route's task starts on it (the loop's queue);
- ``app -> upstream write``: auth, reading and validating the body, the pipeline, building the upstream request;
- ``upstream head -> body``, ``body -> finish``: reading and pricing the answer;
- ``finish``: settlement of budgets and limits; ``record_request`` (log line and metrics) runs on the loop's next turn,
  after the write, with the ledger row;
- ``finish -> write``, ``write -> flush``: building the response, and writing its head and body to the socket.

The wrapping patches Keel's internals (``keel.llm.client``, ``keel.api.protocol``, ``RequestContext.finish``):
a development tool that follows the code, not a stable interface.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
STEPS = [
    ("parsed", "app"),
    ("app", "up_send"),
    ("up_send", "up_head"),
    ("up_head", "body"),
    ("body", "fin0"),
    ("fin0", "fin1"),
    ("rr0", "rr1"),
    ("fin1", "write"),
    ("write", "flush"),
]


def serve_instrumented(argv: list[str], out: Path) -> None:
    """``keel serve`` with timestamps; SIGUSR1 writes the per-step figures to ``out``."""
    from uvicorn.protocols.http import httptools_impl

    from keel.api import context as api_context
    from keel.api import protocol
    from keel.cli import app
    from keel.context import RequestContext
    from keel.llm import client, http, openai
    from keel.pipeline import accounting

    stamps: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("stamps", default=None)
    rows: list[dict[str, int]] = []
    now = time.perf_counter_ns

    def mark(name: str, once: bool = False) -> None:
        d = stamps.get()
        if d is not None and not (once and name in d):
            d[name] = now()

    def wrap(owner: Any, name: str, before: str | None = None, after: str | None = None) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if before:
                    mark(before, once=True)
                result = await original(*args, **kwargs)
                if after:
                    mark(after, once=True)
                return result

            setattr(owner, name, async_wrapper)
        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if before:
                    mark(before, once=True)
                result = original(*args, **kwargs)
                if after:
                    mark(after, once=True)
                return result

            setattr(owner, name, wrapper)

    on_message_complete = httptools_impl.HttpToolsProtocol.on_message_complete

    def parsed(self: Any) -> None:
        self.scope["_t_parsed"] = now()
        on_message_complete(self)

    httptools_impl.HttpToolsProtocol.on_message_complete = parsed  # type: ignore[method-assign]
    serve = protocol.HotCycle.run_asgi

    async def timed(self: Any, app: Any) -> None:
        if self.scope["path"] != "/v1/chat/completions":
            return await serve(self, app)
        d = {"parsed": self.scope.get("_t_parsed", 0), "app": now()}
        stamps.set(d)
        await serve(self, app)
        rows.append(d)

    protocol.HotCycle.run_asgi = timed  # type: ignore[method-assign]
    wrap(client._Connection, "send", before="up_send")
    wrap(client.Response, "head", after="up_head")
    wrap(http, "read_json", after="body")
    openai.read_json = http.read_json  # type: ignore[attr-defined]  # imported by name
    wrap(RequestContext, "finish", before="fin0", after="fin1")
    wrap(accounting, "record_request", before="rr0", after="rr1")
    api_context.record_request = accounting.record_request  # type: ignore[attr-defined]
    wrap(protocol.HotCycle, "_write", before="write")
    wrap(protocol.CoalescingTransport, "write_now", before="flush")

    def dump(signum: int, frame: Any) -> None:
        lines = [f"requests: {len(rows)}"]
        for a, b in STEPS:
            values = sorted((r[b] - r[a]) / 1e6 for r in rows if r.get(a) and r.get(b))
            if values:
                q = [values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] for p in (50, 90, 99)]
                lines.append(f"  {a:>8} -> {b:<8} p50 {q[0]:7.3f}  p90 {q[1]:7.3f}  p99 {q[2]:7.3f} ms")
        out.write_text("\n".join(lines) + "\n")
        rows.clear()

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["keel", *argv]
    app()


async def load(url: str, body: bytes, total: int, concurrency: int) -> list[float]:
    import aiohttp

    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                latencies.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    return latencies


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=600, help="per target, in three rounds")
    ap.add_argument("--delay-ms", type=float, default=50.0)
    args = ap.parse_args()
    import orjson

    sys.path.insert(0, str(Path(__file__).parent))
    from gateway_overhead import free_port, wait_ready

    up, keel = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "keel.yaml", Path(tmp) / "timeline.txt"
        cfg.write_text(
            "logging: {level: warning, format: json, requests: true}\n"
            f"models:\n  - {{name: slow, model: m, api_base: 'http://127.0.0.1:{up}/v1', api_key: k}}\n"
        )
        fake_args = ["-m", "keel.testing.fake_upstream", "--no-record", "--delay-s", str(args.delay_ms / 1000)]
        fake = subprocess.Popen([str(BIN / "python"), *fake_args, "--port", str(up)], stdout=subprocess.DEVNULL)
        server = subprocess.Popen(
            [str(BIN / "python"), __file__, "--serve", str(out), "serve", "--config", str(cfg), "--port", str(keel)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_ready(f"http://127.0.0.1:{up}/v1/models")
            await wait_ready(f"http://127.0.0.1:{keel}/health")
            messages = [{"role": "user", "content": "Which phone has the biggest battery in 2024?"}]
            direct = (f"http://127.0.0.1:{up}/v1/chat/completions", orjson.dumps({"model": "m", "messages": messages}))
            via = (
                f"http://127.0.0.1:{keel}/v1/chat/completions",
                orjson.dumps({"model": "slow", "messages": messages}),
            )
            for target, body in (direct, via):
                await load(target, body, 60, args.concurrency)
            os.kill(server.pid, signal.SIGUSR1)  # drop the warm-up's rows
            await asyncio.sleep(0.3)
            d: list[float] = []
            k: list[float] = []
            for _ in range(3):
                d += await load(*direct, args.requests // 3, args.concurrency)
                k += await load(*via, args.requests // 3, args.concurrency)
            os.kill(server.pid, signal.SIGUSR1)
            await asyncio.sleep(0.5)
            p50 = sorted(k)[len(k) // 2] - sorted(d)[len(d) // 2]
            print(
                f"concurrency {args.concurrency}, upstream answers in {args.delay_ms:g} ms: Keel adds p50 {p50:.3f} ms"
            )
            print(out.read_text(), end="")
        finally:
            for p in (server, fake):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve_instrumented(sys.argv[3:], Path(sys.argv[2]))
    else:
        asyncio.run(main())
