"""Virtual keys, rate limits, budgets and cost accounting through a real Keel (embedded defaults: SQLite and
in-process counters). The cross-worker versions of the same guarantees are in test_across_workers.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from fixtures.redis_server import RedisServer
from helpers import KeelServer, chat_body
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]
MASTER = "sk-master-test-0123456789"
AUTH = f"auth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}\n"

# $1000 per million tokens = 1000 micro-dollars per token: request costs are easy to reason about.
PRICED = """
  - name: smart
    model: up-smart
    api_base: {fake}
    max_retries: 0
    price: {input_per_mtok: 1000, output_per_mtok: 1000}
  - name: cheap
    model: up-cheap
    api_base: {fake}
    price: {input_per_mtok: 1, output_per_mtok: 1}
  - name: unpriced
    model: some-new-model
    api_base: {fake}
"""


class Client:
    def __init__(self, server: KeelServer, session: aiohttp.ClientSession) -> None:
        self.url = server.url
        self.s = session

    async def call(
        self, method: str, path: str, key: str | None = MASTER, body: Any = None
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.s.request(method, self.url + path, json=body, headers=headers) as r:
            data = await r.json(content_type=None) if r.content_type == "application/json" else await r.text()
            return r.status, {k.lower(): v for k, v in r.headers.items()}, data

    async def key(self, **fields: Any) -> tuple[str, str]:
        status, _, data = await self.call("POST", "/v1/admin/keys", body={"user_id": "alice", **fields})
        assert status == 201, data
        return data["id"], data["key"]

    async def chat(self, key: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
        return await self.call("POST", "/v1/chat/completions", key, chat_body(**kw))


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_master_key_guards_every_v1_route(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/admin/keys"),
        ("GET", "/v1/usage"),
    ):
        status, _, body = await c.call(method, path, key=None, body=chat_body())
        assert status == 401 and body["error"]["code"] == "missing_api_key", path
        status, _, body = await c.call(method, path, key="sk-wrong", body=chat_body())
        assert status == 401 and body["error"]["type"] == "authentication_error", path
    status, _, _ = await c.chat(MASTER)
    assert status == 200
    status, _, _ = await c.call("GET", "/health", key=None)
    assert status == 200


async def test_key_lifecycle(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    status, _, created = await c.call(
        "POST",
        "/v1/admin/keys",
        body={
            "user_id": "alice",
            "team_id": "phones",
            "name": "app",
            "models": ["smart", "cheap"],
            "metadata": {"env": "prod"},
        },
    )
    assert status == 201 and created["key"].startswith("sk-keel-")
    key_id, secret = created["id"], created["key"]
    assert created["key_prefix"] == secret[:12]

    status, _, listed = await c.call("GET", "/v1/admin/keys")
    assert [k["id"] for k in listed["data"]] == [key_id]
    assert secret not in str(listed) and "key" not in listed["data"][0]  # shown once, at creation only

    assert (await c.chat(secret))[0] == 200
    status, _, body = await c.chat(secret, model="unpriced")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    status, _, models = await c.call("GET", "/v1/models", secret)
    assert [m["id"] for m in models["data"]] == ["smart", "cheap"]
    status, _, _ = await c.call("POST", "/v1/admin/keys", secret, body={"user_id": "mallory"})
    assert status == 403  # a virtual key cannot administer

    status, _, patched = await c.call("PATCH", f"/v1/admin/keys/{key_id}", body={"models": [], "rpm": 100})
    assert status == 200 and patched["models"] == [] and patched["rpm"] == 100
    assert (await c.chat(secret, model="unpriced"))[0] == 200

    status, _, revoked = await c.call("DELETE", f"/v1/admin/keys/{key_id}")
    assert status == 200 and revoked["revoked"] is True
    assert (await c.chat(secret))[0] == 401
    assert (await c.call("GET", "/v1/admin/keys/key_nope"))[0] == 404
    status, _, body = await c.call("POST", "/v1/admin/keys", body={"team_id": "x"})
    assert status == 400 and body["error"]["param"] == "user_id"


async def test_expired_key_is_refused(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    _, secret = await c.key(expires_at="2020-01-01T00:00:00Z")
    status, _, body = await c.chat(secret)
    assert status == 401 and body["error"]["code"] == "expired_api_key"


async def test_rpm_admits_exactly_the_limit(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    _, secret = await c.key(rpm=4)
    results = await asyncio.gather(*(c.chat(secret) for _ in range(12)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 4 + [429] * 8
    refused = next(r for r in results if r[0] == 429)
    assert refused[2]["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused[1]["retry-after"]) <= 60
    ok = next(r for r in results if r[0] == 200)
    assert ok[1]["x-ratelimit-limit-requests"] == "4"


async def test_tpm_admits_by_estimate_then_settles_actuals(
    keel: Keel, session: aiohttp.ClientSession, fake: FakeUpstreamThread
) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    _, secret = await c.key(tpm=100)
    fake.script({"delay_s": 0.3, "times": 6})  # all ten are in flight together
    # Each request reserves its estimate: 5 prompt tokens ("hi" + framing) + max_tokens 10 = 15.
    results = await asyncio.gather(*(c.chat(secret, content="hi", max_tokens=10) for _ in range(10)))
    assert sorted(r[0] for r in results) == [200] * 6 + [429] * 4
    refused = next(r for r in results if r[0] == 429)
    assert refused[2]["error"]["code"] == "tokens_rate_limit_exceeded"
    # Settled to the actual usage (1 prompt + 2 completion words), the window has room again.
    assert (await c.chat(secret, content="hi", max_tokens=10))[0] == 200


async def test_max_parallel(keel: Keel, session: aiohttp.ClientSession, fake: FakeUpstreamThread) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    _, secret = await c.key(max_parallel=2)
    fake.script({"delay_s": 0.5, "times": 2})
    results = await asyncio.gather(*(c.chat(secret) for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 200, 429, 429, 429]
    assert next(r for r in results if r[0] == 429)[2]["error"]["code"] == "concurrency_limit_exceeded"
    assert (await c.chat(secret))[0] == 200  # slots were released


async def test_budget_holds_under_concurrency(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    key_id, secret = await c.key(budget_usd=0.1, budget_period="daily")
    refused: list[Any] = []
    for _ in range(6):  # waves of concurrent requests until the budget says no
        results = await asyncio.gather(*(c.chat(secret, max_tokens=5) for _ in range(10)))
        refused += [r for r in results if r[0] != 200]
        for status, headers, body in results:
            if status == 200:
                assert float(headers["x-keel-cost-usd"]) == pytest.approx(0.005)  # 5 tokens at $0.001
                assert body["usage"]["cost"] == pytest.approx(0.005)
    assert refused and all(r[0] == 429 and r[2]["error"]["code"] == "budget_exceeded" for r in refused)
    message = refused[0][2]["error"]["message"]
    assert f"key {key_id}" in message and "limit $0.1" in message and "resets at" in message
    _, _, usage = await c.call("GET", "/v1/usage?group_by=key")
    [row] = usage["data"]
    assert row["group"] == key_id and row["cost_usd"] <= 0.1 + 1e-9
    assert row["cost_usd"] >= 0.1 - 0.012  # it was used up to within one reservation of the limit


async def test_user_and_team_budgets_span_keys(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    status, _, _ = await c.call("PUT", "/v1/admin/limits/team/phones", body={"budget_usd": 0.02})
    assert status == 200
    _, k1 = await c.key(team_id="phones")
    _, k2 = await c.key(user_id="bob", team_id="phones")
    statuses = [(await c.chat(k, max_tokens=5))[0] for k in (k1, k2, k1, k2, k1)]
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    status, _, body = await c.chat(k2, max_tokens=5)
    assert status == 429 and "team phones" in body["error"]["message"]


async def test_user_rate_limit_spans_keys(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    await c.call("PUT", "/v1/admin/limits/user/alice", body={"rpm": 3})
    _, k1 = await c.key()
    _, k2 = await c.key()
    statuses = [(await c.chat(k))[0] for k in (k1, k2, k1, k2)]
    assert statuses == [200, 200, 200, 429]


async def test_soft_threshold_downgrades(keel: Keel, session: aiohttp.ClientSession, fake: FakeUpstreamThread) -> None:
    c = Client(keel(PRICED, extra=AUTH + "budgets: {downgrade_model: cheap}\n"), session)
    _, secret = await c.key(budget_usd=1, soft_budget_usd=0.004)
    status, headers, _ = await c.chat(secret, max_tokens=5)  # $0.005: now over the soft threshold
    assert status == 200 and "x-keel-downgraded" not in headers
    status, headers, _ = await c.chat(secret, max_tokens=5)
    assert status == 200 and headers["x-keel-downgraded"] == "smart->cheap"
    assert "soft threshold" in headers["x-keel-downgrade-reason"]
    assert fake.requests[-1]["body"]["model"] == "up-cheap"


async def test_global_cap_emergency_mode(keel: Keel, session: aiohttp.ClientSession, fake: FakeUpstreamThread) -> None:
    extra = AUTH + "budgets: {global_daily_usd: 0.009, emergency_model: cheap, emergency_max_prompt_tokens: 50}\n"
    c = Client(keel(PRICED, extra=extra), session)
    assert (await c.chat(MASTER))[0] == 200
    assert (await c.chat(MASTER))[0] == 200  # $0.010 spent: over the cap
    _, _, state = await c.call("GET", "/v1/admin/emergency")
    assert state["active"] is True and state["cap_micros"] == 9000
    status, headers, _ = await c.chat(MASTER)
    assert status == 200 and headers["x-keel-downgraded"] == "smart->cheap"
    assert fake.requests[-1]["body"]["model"] == "up-cheap"
    status, _, body = await c.chat(MASTER, content="long " * 400)
    assert status == 429 and body["error"]["code"] == "emergency_mode"
    status, _, _ = await c.call("DELETE", "/v1/admin/emergency")
    assert status == 200
    status, headers, _ = await c.chat(MASTER)
    assert "x-keel-downgraded" not in headers and fake.requests[-1]["body"]["model"] == "up-smart"


async def test_unpriced_model_cost_is_unknown_and_budgets_refuse_it(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    status, headers, body = await c.chat(MASTER, model="unpriced")
    assert status == 200 and headers["x-keel-cost-usd"] == "unknown" and body["usage"]["cost"] is None
    _, secret = await c.key(budget_usd=5)
    status, _, body = await c.chat(secret, model="unpriced")
    assert status == 400 and body["error"]["code"] == "model_unpriced"
    _, _, usage = await c.call("GET", "/v1/usage?group_by=model")
    assert {r["group"]: r["unpriced_requests"] for r in usage["data"]} == {"unpriced": 1}


async def test_streaming_final_chunk_carries_cost(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    async with session.post(
        c.url + "/v1/chat/completions", json=chat_body(stream=True), headers={"Authorization": f"Bearer {MASTER}"}
    ) as r:
        lines = [line async for line in r.content if line.startswith(b"data: {")]
    last = orjson.loads(lines[-1][6:])
    assert last["usage"]["cost"] == pytest.approx(0.005)


async def test_usage_reports_and_tenant_isolation(keel: Keel, session: aiohttp.ClientSession) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    a_id, a = await c.key(team_id="t1")
    b_id, b = await c.key(user_id="bob", team_id="t2")
    for key in (a, a, b):
        assert (await c.chat(key))[0] == 200
    assert (await c.chat(b, model="cheap"))[0] == 200
    for group_by, expected in (
        ("key", {a_id: 2, b_id: 2}),
        ("user", {"alice": 2, "bob": 2}),
        ("team", {"t1": 2, "t2": 2}),
        ("model", {"smart": 3, "cheap": 1}),
    ):
        _, _, report = await c.call("GET", f"/v1/usage?group_by={group_by}")
        assert {r["group"]: r["requests"] for r in report["data"]} == expected, group_by
    _, _, by_day = await c.call("GET", "/v1/usage?group_by=day")
    assert len(by_day["data"]) == 1 and by_day["data"][0]["requests"] == 4
    # A virtual key sees its own usage only, whatever filters it sends.
    _, _, own = await c.call("GET", f"/v1/usage?group_by=key&key_id={a_id}", b)
    assert [r["group"] for r in own["data"]] == [b_id]
    status, _, body = await c.call("GET", "/v1/usage?group_by=planet")
    assert status == 400 and body["error"]["param"] == "group_by"


async def test_budget_survives_restart(keel: Keel, session: aiohttp.ClientSession, tmp_path: Any) -> None:
    db = f"database_url: sqlite+aiosqlite:///{tmp_path}/shared.db\n"
    first = keel(PRICED, extra=AUTH + db)
    c = Client(first, session)
    _, secret = await c.key(budget_usd=0.02)
    # Each request costs $0.004 (2 + 2 tokens) and reserves $0.009 (7 estimated prompt tokens + max_tokens 2).
    assert [(await c.chat(secret, max_tokens=2))[0] for _ in range(4)] == [200, 200, 200, 429]
    first.stop()  # flushes the ledger
    c = Client(keel(PRICED, extra=AUTH + db), session)  # fresh in-process counters, seeded from the ledger
    status, _, body = await c.chat(secret, max_tokens=2)
    assert status == 429 and "spent $0.012" in body["error"]["message"]


async def test_secret_never_logged(
    keel: Keel, session: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    c = Client(keel(PRICED, extra=AUTH), session)
    _, secret = await c.key()
    await c.chat(secret)
    await c.chat("sk-keel-not-a-real-key-but-secret")
    await asyncio.sleep(0.2)
    out, err = capfd.readouterr()
    for s in (secret, MASTER, "sk-keel-not-a-real-key-but-secret", "sk-upstream"):
        assert s not in out + err


async def test_budget_spend_survives_a_redis_restart(
    keel: Keel, session: aiohttp.ClientSession, redis_server: RedisServer, redis_url: str
) -> None:
    """Redis restarts empty (no persistence): the counters forget the period's spend. The new connection tells
    Keel to seed every budget from the ledger again, so the key still cannot spend more than its budget."""
    extra = AUTH + f"redis_url: {redis_url}\naccounting: {{flush_interval_s: 0.05}}\n"
    c = Client(keel(PRICED, extra=extra), session)
    key_id, secret = await c.key(budget_usd=0.03, budget_period="daily")
    for _ in range(3):
        assert (await c.chat(secret, max_tokens=5))[0] == 200  # $0.005 each
    await asyncio.sleep(0.3)  # in the ledger
    redis_server.stop()
    redis_server.start()
    statuses = [(await c.chat(secret, max_tokens=5))[0] for _ in range(8)]
    assert set(statuses) <= {200, 429, 503}  # 503 at most while the pool finds its connections dead
    assert statuses.count(200) >= 1 and statuses[-1] == 429
    await asyncio.sleep(0.3)
    _, _, usage = await c.call("GET", "/v1/usage?group_by=key")
    [row] = usage["data"]
    assert row["group"] == key_id and row["cost_usd"] <= 0.03 + 1e-9  # without the re-seed: $0.015 + 5 x $0.005
