"""The Counters contract, run against both implementations: in process, and in a real redis-server.

Windows use small ``window_s`` and real (short) sleeps; the Redis cases run on the server's clock and the memory
cases on the monotonic clock, which is exactly what production does.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from fixtures.redis_server import RedisServer, free_port
from keel.config import ConfigError
from keel.state import (
    Admission,
    BudgetLimit,
    ConcurrencyLimit,
    Counters,
    CountersUnavailable,
    MemoryCounters,
    RedisCounters,
    WindowLimit,
    counters_from_url,
)


def lid() -> str:
    return uuid.uuid4().hex


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    c: Counters = MemoryCounters() if request.param == "memory" else RedisCounters(request.getfixturevalue("redis_url"))
    yield c
    await c.aclose()


# --- sliding windows ---------------------------------------------------------------------------------------------


async def test_window_is_exact_under_concurrency(counters: Counters) -> None:
    w = WindowLimit("rpm:key:a", limit=10, amount=1)
    results = await asyncio.gather(*(counters.admit(lid(), [w]) for _ in range(30)))
    allowed = [r for r in results if r.allowed]
    assert len(allowed) == 10
    assert sorted(r.remaining[0] for r in allowed) == list(range(10))
    for r in results:
        if not r.allowed:
            assert r.denial is not None
            assert (r.denial.kind, r.denial.index, r.denial.key, r.denial.limit) == ("window", 0, w.key, 10)
            assert r.denial.current == 10
            assert r.denial.retry_after_s is not None and 0 < r.denial.retry_after_s <= 60
            assert r.remaining == [0]


async def test_window_slides_and_retry_after_is_when_it_fits(counters: Counters) -> None:
    w = WindowLimit("rpm:key:slide", limit=3, amount=1, window_s=2)
    for _ in range(3):
        assert (await counters.admit(lid(), [w])).allowed
    denied = await counters.admit(lid(), [w])
    assert not denied.allowed and denied.denial is not None
    retry = denied.denial.retry_after_s
    assert retry is not None and 0 < retry <= 2
    assert not (await counters.admit(lid(), [w])).allowed  # a refusal takes nothing, and changes nothing
    await asyncio.sleep(retry + 0.05)
    assert (await counters.admit(lid(), [w])).allowed


async def test_retry_after_waits_only_for_the_buckets_it_needs(counters: Counters) -> None:
    key = "tpm:key:buckets"
    assert (await counters.admit(lid(), [WindowLimit(key, 4, 2, window_s=3)])).allowed
    await asyncio.sleep(1.1)
    assert (await counters.admit(lid(), [WindowLimit(key, 4, 2, window_s=3)])).allowed
    two = await counters.admit(lid(), [WindowLimit(key, 4, 2, window_s=3)])
    four = await counters.admit(lid(), [WindowLimit(key, 4, 4, window_s=3)])
    assert two.denial is not None and four.denial is not None
    assert two.denial.retry_after_s is not None and four.denial.retry_after_s is not None
    assert 0.8 < two.denial.retry_after_s <= 1.95  # the first bucket leaves the window
    assert two.denial.retry_after_s < four.denial.retry_after_s <= 3  # both must leave


async def test_amount_over_the_limit_is_refused_without_a_retry(counters: Counters) -> None:
    w = WindowLimit("tpm:key:big", limit=100, amount=101)
    a = await counters.admit(lid(), [w])
    assert not a.allowed and a.denial is not None
    assert (a.denial.kind, a.denial.current, a.denial.retry_after_s) == ("window", 0, None)
    assert a.remaining == [100]
    assert (await counters.admit(lid(), [WindowLimit(w.key, 100, 100)])).allowed  # it took nothing


async def test_settle_corrects_the_window_to_the_actual_amount(counters: Counters) -> None:
    w = WindowLimit("tpm:key:settle", limit=100, amount=60)
    a = await counters.admit(lid(), [w])
    assert a.allowed and a.remaining == [40]
    await counters.settle(a, [20])
    await counters.settle(a, [20])  # idempotent: the correction applies once
    assert not (await counters.admit(lid(), [WindowLimit(w.key, 100, 81)])).allowed
    b = await counters.admit(lid(), [WindowLimit(w.key, 100, 80)])
    assert b.allowed and b.remaining == [0]
    await counters.settle(b)  # None keeps the reserved amounts
    assert not (await counters.admit(lid(), [WindowLimit(w.key, 100, 1)])).allowed


# --- all or nothing ----------------------------------------------------------------------------------------------


async def test_a_denial_on_a_later_limit_leaves_the_earlier_ones_untouched(counters: Counters) -> None:
    user = WindowLimit("rpm:user:u", limit=5, amount=1)
    key = WindowLimit("rpm:key:k", limit=1, amount=1)
    assert (await counters.admit(lid(), [key])).allowed
    refused = await counters.admit(lid(), [user, key])
    assert not refused.allowed and refused.denial is not None
    assert (refused.denial.kind, refused.denial.index, refused.denial.key) == ("window", 1, key.key)
    assert refused.remaining == [5, 0] and refused.buckets == []
    assert (await counters.admit(lid(), [WindowLimit(user.key, 5, 5)])).allowed  # user's window still empty


async def test_a_budget_denial_takes_no_window_and_no_lease(counters: Counters) -> None:
    w = WindowLimit("rpm:key:aon", limit=1, amount=1)
    c = ConcurrencyLimit("par:key:aon", limit=1)
    b = BudgetLimit("budget:key:aon:2025-01", limit_micros=100, amount_micros=101, ttl_s=60)
    refused = await counters.admit(lid(), [w], [c], [b])
    assert not refused.allowed and refused.denial is not None
    assert (refused.denial.kind, refused.denial.index, refused.denial.limit) == ("budget", 0, 100)
    assert refused.denial.retry_after_s is None
    assert (await counters.admit(lid(), [w], [c])).allowed
    assert await counters.budget_spent([b.key]) == [(0, 0)]


async def test_a_concurrency_denial_takes_no_window(counters: Counters) -> None:
    c = ConcurrencyLimit("par:key:aon2", limit=1)
    assert (await counters.admit(lid(), [], [c])).allowed
    w = WindowLimit("rpm:key:aon2", limit=1, amount=1)
    refused = await counters.admit(lid(), [w], [c])
    assert refused.denial is not None and refused.denial.kind == "concurrency"
    assert (await counters.admit(lid(), [w])).allowed


async def test_no_limits_is_allowed(counters: Counters) -> None:
    a = await counters.admit(lid())
    assert a.allowed and a.remaining == [] and a.denial is None
    await counters.settle(a, cost_micros=5)


# --- concurrency leases ------------------------------------------------------------------------------------------


async def test_leases_are_released_at_settle(counters: Counters) -> None:
    c = ConcurrencyLimit("par:key:l", limit=2)
    first, second = await counters.admit(lid(), leases=[c]), await counters.admit(lid(), leases=[c])
    assert first.allowed and second.allowed
    third = await counters.admit(lid(), leases=[c])
    assert third.denial is not None
    assert (third.denial.kind, third.denial.limit, third.denial.current) == ("concurrency", 2, 2)
    assert third.denial.retry_after_s is not None and 0 < third.denial.retry_after_s <= 1
    await counters.settle(first)
    await counters.settle(first)  # a second settle does not free a second slot
    assert (await counters.admit(lid(), leases=[c])).allowed
    assert not (await counters.admit(lid(), leases=[c])).allowed


async def test_leases_expire(counters: Counters) -> None:
    c = ConcurrencyLimit("par:key:ttl", limit=1, ttl_s=0.3)
    assert (await counters.admit(lid(), leases=[c])).allowed
    refused = await counters.admit(lid(), leases=[c])
    assert refused.denial is not None
    assert refused.denial.retry_after_s is not None and refused.denial.retry_after_s <= 0.3
    await asyncio.sleep(0.4)
    assert (await counters.admit(lid(), leases=[c])).allowed


async def test_zero_concurrency_never_admits(counters: Counters) -> None:
    refused = await counters.admit(lid(), leases=[ConcurrencyLimit("par:key:zero", limit=0)])
    assert refused.denial is not None and refused.denial.retry_after_s is None


# --- budgets -----------------------------------------------------------------------------------------------------


async def test_budget_reservations_never_overshoot(counters: Counters) -> None:
    b = BudgetLimit("budget:key:b:2025-01", limit_micros=1_000_000, amount_micros=30_000, ttl_s=60)
    results = await asyncio.gather(*(counters.admit(lid(), budgets=[b]) for _ in range(50)))
    allowed = [r for r in results if r.allowed]
    assert len(allowed) == 33  # 33 x 30_000 fits, 34 does not
    assert await counters.budget_spent([b.key]) == [(0, 990_000)]
    for r in results:
        if not r.allowed:
            assert r.denial is not None
            assert (r.denial.kind, r.denial.limit, r.denial.current) == ("budget", 1_000_000, 990_000)


async def test_settle_turns_the_reservation_into_spend_once(counters: Counters) -> None:
    b = BudgetLimit("budget:key:s:2025-01", limit_micros=100, amount_micros=60, ttl_s=60)
    a = await counters.admit(lid(), budgets=[b])
    assert a.allowed
    assert await counters.budget_spent([b.key, "budget:unknown"]) == [(0, 60), (0, 0)]
    await counters.settle(a, cost_micros=25)
    await counters.settle(a, cost_micros=25)
    assert await counters.budget_spent([b.key]) == [(25, 0)]
    assert (await counters.admit(lid(), budgets=[BudgetLimit(b.key, 100, 75, 60)])).allowed
    refused = await counters.admit(lid(), budgets=[BudgetLimit(b.key, 100, 1, 60)])
    assert refused.denial is not None and refused.denial.current == 100


async def test_settle_of_a_refused_admission_does_nothing(counters: Counters) -> None:
    b = BudgetLimit("budget:key:r:2025-01", limit_micros=10, amount_micros=11, ttl_s=60)
    refused = await counters.admit(lid(), budgets=[b])
    await counters.settle(refused, cost_micros=5)
    assert await counters.budget_spent([b.key]) == [(0, 0)]


async def test_every_budget_of_the_admission_is_charged(counters: Counters) -> None:
    key = BudgetLimit("budget:key:m:2025-01", limit_micros=1000, amount_micros=10, ttl_s=60)
    team = BudgetLimit("budget:team:m:2025-01", limit_micros=5000, amount_micros=10, ttl_s=60)
    world = BudgetLimit("budget:global:2025-01-01", limit_micros=None, amount_micros=10, ttl_s=60)
    a = await counters.admit(lid(), budgets=[key, team, world])
    assert a.allowed
    await counters.settle(a, cost_micros=7)
    assert await counters.budget_spent([key.key, team.key, world.key]) == [(7, 0)] * 3


async def test_reservations_expire_but_settle_still_charges(counters: Counters) -> None:
    b = BudgetLimit("budget:key:x:2025-01", limit_micros=100, amount_micros=80, ttl_s=60, reservation_ttl_s=0.3)
    slow = await counters.admit(lid(), budgets=[b])
    assert slow.allowed
    assert not (await counters.admit(lid(), budgets=[b])).allowed
    await asyncio.sleep(0.4)
    assert await counters.budget_spent([b.key]) == [(0, 0)]
    assert (await counters.admit(lid(), budgets=[BudgetLimit(b.key, 100, 80, 60)])).allowed
    await counters.settle(slow, cost_micros=10)  # the request outlived its reservation: its cost still counts
    assert await counters.budget_spent([b.key]) == [(10, 80)]


async def test_no_limit_tracks_spend_and_never_refuses(counters: Counters) -> None:
    b = BudgetLimit("budget:global:2025-01-02", limit_micros=None, amount_micros=10**12, ttl_s=60)
    a = await counters.admit(lid(), budgets=[b])
    assert a.allowed
    await counters.settle(a, cost_micros=123_456_789_012_345)  # past 2^46: large integers stay exact
    assert await counters.budget_spent([b.key]) == [(123_456_789_012_345, 0)]


async def test_budget_seed_only_ever_raises_the_counter(counters: Counters) -> None:
    """The ledger lags the counters, so a seed below them changes nothing; above them (a counter Redis lost and
    later requests started again from zero) it restores the spend."""
    key = "budget:key:seed:2025-01"
    assert await counters.budget_seed(key, 500, 60)
    assert not await counters.budget_seed(key, 400, 60)
    assert not await counters.budget_seed(key, 500, 60)
    assert await counters.budget_spent([key]) == [(500, 0)]
    a = await counters.admit(lid(), budgets=[BudgetLimit(key, 1000, 300, 60)])
    assert a.allowed
    assert await counters.budget_seed(key, 600, 60)
    assert await counters.budget_spent([key]) == [(600, 300)]  # the reservation in flight is kept
    assert not (await counters.admit(lid(), budgets=[BudgetLimit(key, 1000, 101, 60)])).allowed
    await counters.settle(a, cost_micros=100)
    assert await counters.budget_spent([key]) == [(700, 0)]


async def test_budget_seed_initialises_a_budget_that_only_has_reservations(counters: Counters) -> None:
    key = "budget:key:seed2:2025-01"
    assert (await counters.admit(lid(), budgets=[BudgetLimit(key, 1000, 300, 60)])).allowed
    assert await counters.budget_seed(key, 200, 60)
    assert await counters.budget_spent([key]) == [(200, 300)]


async def test_budget_counters_expire_after_ttl(counters: Counters) -> None:
    key = "budget:key:ttl:2025-01"
    assert await counters.budget_seed(key, 500, 1)
    await asyncio.sleep(1.2)
    assert await counters.budget_spent([key]) == [(0, 0)]
    assert await counters.budget_seed(key, 700, 60)


async def test_budget_spent_of_nothing(counters: Counters) -> None:
    assert await counters.budget_spent([]) == []


# --- plain values ------------------------------------------------------------------------------------------------


async def test_kv_get_set_ttl_delete(counters: Counters) -> None:
    assert await counters.get("emergency") is None
    await counters.set("emergency", b'{"since": 1}')
    assert await counters.get("emergency") == b'{"since": 1}'
    await counters.set("emergency", b"2")
    assert await counters.get("emergency") == b"2"
    await counters.delete("emergency")
    await counters.delete("emergency")
    assert await counters.get("emergency") is None
    await counters.set("short", b"x", ttl_s=0.2)
    assert await counters.get("short") == b"x"
    await asyncio.sleep(0.3)
    assert await counters.get("short") is None


async def test_ping(counters: Counters) -> None:
    await counters.ping()


# --- factory -----------------------------------------------------------------------------------------------------


async def test_counters_from_url(redis_url: str) -> None:
    assert isinstance(counters_from_url(None), MemoryCounters)
    assert isinstance(counters_from_url(""), MemoryCounters)
    shared = counters_from_url(redis_url)
    assert isinstance(shared, RedisCounters)
    await shared.ping()
    await shared.aclose()
    for other in ("unix:///run/redis/redis.sock", "rediss://:pw@redis.internal:6380/1"):
        not_connected_yet = counters_from_url(other)
        assert isinstance(not_connected_yet, RedisCounters)
        await not_connected_yet.aclose()
    with pytest.raises(ConfigError, match=r"not a Redis URL.*redis://") as info:
        counters_from_url("memcached://:hunter2@localhost:11211")
    assert "hunter2" not in str(info.value)


# --- both at once ------------------------------------------------------------------------------------------------


async def test_memory_and_redis_agree_on_a_random_workload(redis_url: str) -> None:
    """The same random admits, settles, seeds and reads give the same answers from both (no expiry in play, so
    the clocks do not matter; retry_after is compared for presence only)."""
    rng = random.Random(7)
    memory, shared = MemoryCounters(), RedisCounters(redis_url)
    admitted: list[tuple[Admission, Admission]] = []
    try:
        for _ in range(400):
            op = rng.random()
            if op < 0.6:
                windows = [
                    WindowLimit(f"w{k}", rng.choice([3, 10, 50]), rng.randint(0, 12))
                    for k in rng.sample(range(4), rng.randint(0, 2))
                ]
                leases = [ConcurrencyLimit(f"c{k}", rng.randint(0, 4)) for k in rng.sample(range(3), rng.randint(0, 1))]
                budgets = [
                    BudgetLimit(f"b{k}", rng.choice([None, 500, 2000]), rng.randint(0, 300), 60)
                    for k in rng.sample(range(3), rng.randint(0, 2))
                ]
                lease_id = lid()
                pair = (
                    await memory.admit(lease_id, windows, leases, budgets),
                    await shared.admit(lease_id, windows, leases, budgets),
                )
                m, r = pair
                assert (m.allowed, m.remaining, m.denial and m.denial.kind, m.denial and m.denial.index) == (
                    r.allowed,
                    r.remaining,
                    r.denial and r.denial.kind,
                    r.denial and r.denial.index,
                )
                if m.denial and r.denial:
                    assert (m.denial.key, m.denial.limit, m.denial.current) == (
                        r.denial.key,
                        r.denial.limit,
                        r.denial.current,
                    )
                    assert (m.denial.retry_after_s is None) == (r.denial.retry_after_s is None)
                admitted.append(pair)
            elif op < 0.85 and admitted:
                m, r = rng.choice(admitted)
                actuals = [rng.randint(0, 15) for _ in m.windows] if rng.random() < 0.7 else None
                cost = rng.randint(0, 200)
                await memory.settle(m, actuals, cost)
                await shared.settle(r, actuals, cost)
            elif op < 0.9:
                key, spent = f"b{rng.randrange(3)}", rng.randint(0, 1000)
                assert await memory.budget_seed(key, spent, 60) == await shared.budget_seed(key, spent, 60)
            else:
                keys = [f"b{k}" for k in range(4)]
                assert await memory.budget_spent(keys) == await shared.budget_spent(keys)
    finally:
        await shared.aclose()


# --- Redis only --------------------------------------------------------------------------------------------------


async def test_two_workers_admit_exactly_the_limit_together(redis_url: str) -> None:
    one, two = RedisCounters(redis_url), RedisCounters(redis_url)
    try:
        w = WindowLimit("rpm:key:shared", limit=20, amount=1)
        b = BudgetLimit("budget:key:shared:2025-01", limit_micros=1000, amount_micros=100, ttl_s=60)
        results = await asyncio.gather(*(worker.admit(lid(), [w], [], [b]) for worker in (one, two) * 30))
        assert sum(r.allowed for r in results) == 10  # the budget binds first
        assert await one.budget_spent([b.key]) == await two.budget_spent([b.key]) == [(0, 1000)]
        await asyncio.gather(*(two.settle(r, cost_micros=50) for r in results))
        assert await one.budget_spent([b.key]) == [(500, 0)]
        more = await asyncio.gather(*(worker.admit(lid(), [w]) for worker in (one, two) * 10))
        assert sum(r.allowed for r in more) == 10  # the window had 10 of 20 left
    finally:
        await one.aclose()
        await two.aclose()


async def test_every_key_is_tagged_and_expires(redis_url: str) -> None:
    counters = RedisCounters(redis_url)
    raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        a = await counters.admit(
            lid(),
            [WindowLimit("rpm:k", 5, 1)],
            [ConcurrencyLimit("par:k", 5)],
            [BudgetLimit("budget:k:2025-01", 100, 10, 60)],
        )
        pending = await counters.admit(lid(), [WindowLimit("rpm:k", 5, 1)], [ConcurrencyLimit("par:k", 5)])
        await counters.settle(a, [1], 5)
        assert pending.allowed
        keys = sorted(map(str, await raw.keys("*")))
        assert keys and all(k.startswith("keel:{keel}:") for k in keys), keys  # one hash slot (Redis Cluster)
        for k in keys:
            assert await raw.pttl(k) > 0, f"{k} never expires"
    finally:
        await counters.aclose()
        await raw.aclose()


async def test_redis_down_is_counters_unavailable_promptly_and_recovers(
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    counters = RedisCounters(redis_url, socket_timeout=0.5)
    w = WindowLimit("rpm:key:outage", limit=5, amount=1)
    try:
        admitted = await counters.admit(lid(), [w])
        assert admitted.allowed
        redis_server.stop()
        calls = {
            "admit": lambda: counters.admit(lid(), [w]),
            "settle": lambda: counters.settle(admitted),
            "budget_spent": lambda: counters.budget_spent(["budget:k"]),
            "get": lambda: counters.get("emergency"),
            "ping": counters.ping,
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(CountersUnavailable, match=re.escape(f"Redis is unreachable at {redis_url}")) as info:
                await call()
            assert time.monotonic() - started < 1.0, name
            assert info.value.status == 503 and info.value.code == "limits_backend_unavailable"
        redis_server.start()
        await counters.ping()
        assert (await counters.admit(lid(), [w])).allowed  # scripts reloaded after NOSCRIPT
        await counters.settle(admitted)  # its state went with the old server: a harmless no-op
    finally:
        redis_server.start()
        await counters.aclose()


async def test_unreachable_url_hides_the_password() -> None:
    counters = RedisCounters(f"redis://admin:hunter2@127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    try:
        with pytest.raises(CountersUnavailable) as info:
            await counters.ping()
        message = str(info.value)
        assert "hunter2" not in message and "admin:***@127.0.0.1" in message and "unreachable" in message
    finally:
        await counters.aclose()


# --- memory only -------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_prunes_expired_keys() -> None:
    clock = FakeClock()
    counters = MemoryCounters(clock=clock)
    per_round = 5_000
    for round_ in range(4):
        for i in range(per_round):
            a = await counters.admit(
                lid(),
                [WindowLimit(f"rpm:{round_}:{i}", 10, 1, window_s=1)],
                [ConcurrencyLimit(f"par:{round_}:{i}", 2)],
                [BudgetLimit(f"budget:{round_}:{i}", 100, 1, ttl_s=5)],
            )
            await counters.settle(a, cost_micros=1)
        # Live now: this round's windows and budgets (the settled lease sets are empty, so dead).
        assert len(counters) <= 3 * per_round
        clock.now += 10
    assert await counters.budget_spent(["budget:0:0"]) == [(0, 0)]


async def test_memory_unsettled_admissions_expire() -> None:
    clock = FakeClock()
    counters = MemoryCounters(clock=clock)
    first = await counters.admit(lid(), [WindowLimit("rpm:x", 10, 1)])
    clock.now += 3601
    for i in range(10):
        await counters.set(f"k{i}", b"v")
    assert len(counters) == 10  # the window and the admission mark were swept
    await counters.settle(first)  # too late: a no-op


async def test_memory_max_keys_evicts_the_least_recently_used() -> None:
    counters = MemoryCounters(max_keys=100)
    await counters.set("hot", b"1")
    for i in range(1000):
        await counters.set(f"k{i}", b"v")
        assert await counters.get("hot") == b"1"  # touched, so never the least recently used
    assert len(counters) == 100
    assert await counters.get("k0") is None and await counters.get("k999") == b"v"


async def test_memory_sweep_never_drops_an_entry_in_use() -> None:
    clock = FakeClock()
    counters = MemoryCounters(clock=clock)
    old = WindowLimit("rpm:old", limit=2, amount=1, window_s=1)
    assert (await counters.admit(lid(), [old])).allowed
    clock.now += 5  # "rpm:old" is now empty (dead) and first in line for the sweep
    assert (await counters.admit(lid(), [WindowLimit("rpm:new", 2, 1), WindowLimit(old.key, 2, 2, window_s=1)])).allowed
    assert not (await counters.admit(lid(), [old])).allowed  # the second admit's units were kept
