"""Limits and budgets hold across workers: two Keel processes sharing a real Redis and a real PostgreSQL, and
what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fixtures.postgres_server import PostgresServer
from fixtures.redis_server import RedisServer, free_port
from helpers import KeelServer, chat_body
from keel.testing.fake_upstream import FakeUpstreamThread

KEEL = str(Path(sys.executable).parent / "keel")
MASTER = "sk-master-across-workers"


def config(fake: FakeUpstreamThread, database_url: str, redis_url: str, extra: str = "") -> str:
    return f"""
database_url: {database_url}
redis_url: {redis_url}
auth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}
logging: {{level: warning, requests: false}}
{extra}
models:
  - name: smart
    model: up-smart
    api_base: {fake.base_url}/v1
    max_retries: 0
    price: {{input_per_mtok: 1000, output_per_mtok: 1000}}
"""


class Workers:
    """Separate ``keel serve`` processes: nothing is shared between them but Redis and PostgreSQL."""

    def __init__(self, cfg: Path, n: int) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.procs = [
            subprocess.Popen(
                [KEEL, "serve", "--config", str(cfg), "--port", str(p)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "KEEL_MASTER_KEY": ""},
            )
            for p in self.ports
        ]

    async def wait(self) -> None:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as s:
            for port in self.ports:
                while True:
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        errors = [
                            p.stderr.read().decode() if p.stderr and p.poll() is not None else "" for p in self.procs
                        ]
                        raise RuntimeError(f"workers did not start: {errors}")
                    await asyncio.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[str, int], Workers]]:
    started: list[Workers] = []

    def start(text: str, n: int = 2) -> Workers:
        cfg = tmp_path / f"keel-{len(started)}.yaml"
        cfg.write_text(text)
        w = Workers(cfg, n)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def _post(s: aiohttp.ClientSession, port: int, path: str, key: str, body: Any) -> tuple[int, Any]:
    async with s.post(f"http://127.0.0.1:{port}{path}", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json(content_type=None)


async def _key(s: aiohttp.ClientSession, port: int, **fields: Any) -> str:
    status, data = await _post(s, port, "/v1/admin/keys", MASTER, {"user_id": "alice", **fields})
    assert status == 201, data
    return str(data["key"])


async def _burst(s: aiohttp.ClientSession, w: Workers, key: str, n: int, **body: Any) -> list[tuple[int, Any]]:
    """``n`` concurrent requests, alternating between the workers."""
    return await asyncio.gather(
        *(_post(s, w.ports[i % len(w.ports)], "/v1/chat/completions", key, chat_body(**body)) for i in range(n))
    )


async def test_rpm_exact_across_two_workers(
    workers: Callable[..., Workers], fake: FakeUpstreamThread, redis_url: str, postgres_server: PostgresServer
) -> None:
    w = workers(config(fake, postgres_server.new_database(), redis_url))
    await w.wait()
    async with aiohttp.ClientSession() as s:
        key = await _key(s, w.ports[0], rpm=5)
        results = await _burst(s, w, key, 15)
    assert sorted(status for status, _ in results) == [200] * 5 + [429] * 10, results


async def test_tpm_exact_across_two_workers(
    workers: Callable[..., Workers], fake: FakeUpstreamThread, redis_url: str, postgres_server: PostgresServer
) -> None:
    w = workers(config(fake, postgres_server.new_database(), redis_url))
    await w.wait()
    fake.script({"delay_s": 0.3, "times": 20})
    async with aiohttp.ClientSession() as s:
        key = await _key(s, w.ports[1], tpm=60)
        # 5 estimated prompt tokens + max_tokens 10 = 15 reserved each: exactly 4 fit in 60.
        results = await _burst(s, w, key, 12, content="hi", max_tokens=10)
    assert sorted(status for status, _ in results) == [200] * 4 + [429] * 8


async def test_budget_holds_across_two_workers(
    workers: Callable[..., Workers], fake: FakeUpstreamThread, redis_url: str, postgres_server: PostgresServer
) -> None:
    w = workers(config(fake, postgres_server.new_database(), redis_url))
    await w.wait()
    async with aiohttp.ClientSession() as s:
        key = await _key(s, w.ports[0], budget_usd=0.05, budget_period="monthly")
        admitted = 0
        for _ in range(5):
            results = await _burst(s, w, key, 12, max_tokens=5)
            admitted += sum(1 for status, _ in results if status == 200)
            assert all(status in (200, 429) for status, _ in results)
        await asyncio.sleep(1.5)  # one ledger flush interval
        async with s.get(
            f"http://127.0.0.1:{w.ports[1]}/v1/usage?group_by=user", headers={"Authorization": f"Bearer {MASTER}"}
        ) as r:
            report = await r.json()
    [row] = report["data"]
    assert row["requests"] == admitted > 0
    # Each request costs $0.005; none was admitted past the $0.05 budget, on either worker.
    assert row["cost_usd"] <= 0.05 + 1e-9 and admitted <= 10


async def test_redis_down_fails_closed_visibly(
    keel: Callable[..., KeelServer], redis_server: RedisServer, fake: FakeUpstreamThread, tmp_path: Path
) -> None:
    extra = f"redis_url: {redis_server.url}\nauth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}\n"
    models = "  - {name: smart, model: up, api_base: '{fake}', price: {input_per_mtok: 1, output_per_mtok: 1}}\n"
    server = keel(models, extra=extra)
    async with aiohttp.ClientSession() as s:
        key = await _key(s, int(server.url.rsplit(":", 1)[1]), rpm=100)
        port = int(server.url.rsplit(":", 1)[1])
        assert (await _post(s, port, "/v1/chat/completions", key, chat_body()))[0] == 200
        redis_server.stop()
        try:
            t0 = time.monotonic()
            status, body = await _post(s, port, "/v1/chat/completions", key, chat_body())
            assert status == 503 and body["error"]["code"] == "limits_backend_unavailable"
            assert "Redis is unreachable" in body["error"]["message"] and time.monotonic() - t0 < 3
            async with s.get(server.url + "/ready") as r:
                ready = await r.json()
            assert r.status == 503 and ready["checks"]["counters"]["ok"] is False
            # The master key has no limits: it is still served (nothing to meter).
            assert (await _post(s, port, "/v1/chat/completions", MASTER, chat_body()))[0] == 200
        finally:
            redis_server.start()
        assert (await _post(s, port, "/v1/chat/completions", key, chat_body()))[0] == 200


async def test_redis_down_fail_open_admits_unmetered(
    keel: Callable[..., KeelServer], redis_server: RedisServer, fake: FakeUpstreamThread
) -> None:
    extra = (
        f"redis_url: {redis_server.url}\nauth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}\n"
        "limits: {failure_policy: open}\n"
    )
    models = "  - {name: smart, model: up, api_base: '{fake}', price: {input_per_mtok: 1, output_per_mtok: 1}}\n"
    server = keel(models, extra=extra)
    port = int(server.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as s:
        key = await _key(s, port, rpm=100)
        redis_server.stop()
        try:
            async with s.post(
                server.url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status == 200 and r.headers["x-keel-limits"] == "unenforced"
            async with s.get(server.url + "/ready") as r:
                ready = await r.json()
            assert r.status == 200 and ready["checks"]["counters"]["ok"] is False
        finally:
            redis_server.start()
