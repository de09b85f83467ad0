"""The durable store on both databases: migrations, keys, budgets, the spend ledger and the batch writer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, insert, text
from sqlalchemy.exc import IntegrityError

from fixtures.postgres_server import PostgresServer
from keel.errors import InvalidRequest
from keel.store import (
    BatchWriter,
    Database,
    KeyRepository,
    ScopeLimitsRepository,
    SpendRepository,
    VirtualKey,
    default_sqlite_url,
    hash_secret,
)
from keel.store.db import MIGRATION_LOCK_ID, _upgrade_head, normalize_url
from keel.store.models import Base, SpendRecord
from keel.store.spend import _row


def _heads() -> frozenset[str]:
    config = Config()
    config.set_main_option("script_location", "keel.store:migrations")
    return frozenset(ScriptDirectory.from_config(config).get_heads())


HEAD = _heads()
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def version(db: Database) -> frozenset[str]:
    """The revisions the database is at (one per migration branch)."""
    async with db.engine.connect() as conn:
        return frozenset(
            str(v) for v in (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars()
        )


def fresh_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'dir' / 'keel.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database().replace("postgresql+asyncpg://", "postgresql://")


# --- Database and migrations ---------------------------------------------------------------------------------


async def test_migrated_schema_matches_models_and_migrate_is_idempotent(database: Database) -> None:
    def diff(conn: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    assert await version(database) == HEAD
    await database.migrate()
    assert await version(database) == HEAD
    async with database.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_concurrent_migrate_from_several_workers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = fresh_url(kind, request, tmp_path)
    workers = [Database.from_url(url) for _ in range(4)]
    try:
        await asyncio.gather(*(db.migrate() for db in workers))
        assert {await version(db) for db in workers} == {HEAD}
    finally:
        for db in workers:
            await db.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_migrate_waits_while_another_process_holds_the_migration_lock(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What makes migrate() safe across processes: while another one is mid-migration (lock taken, tables created,
    not committed), it waits on the database's own lock, then finds the schema current instead of creating the
    tables a second time."""
    url = fresh_url(kind, request, tmp_path)
    other_process, worker = Database.from_url(url), Database.from_url(url)
    try:
        async with other_process.engine.connect() as conn:
            if kind == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            else:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.run_sync(_upgrade_head)
            migrating = asyncio.create_task(worker.migrate())
            await asyncio.sleep(0.3)
            assert not migrating.done()
            await conn.commit()
        await migrating
        assert await version(worker) == HEAD
    finally:
        await other_process.dispose()
        await worker.dispose()


async def test_sqlite_is_tuned_for_concurrency(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'a' / 'keel.db'}")
    try:
        async with db.engine.connect() as conn:
            pragmas = {
                p: (await conn.exec_driver_sql(f"PRAGMA {p}")).scalar() for p in ("journal_mode", "foreign_keys")
            }
            pragmas["busy_timeout"] = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
            pragmas["synchronous"] = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10_000, "synchronous": 1}
        assert (tmp_path / "a" / "keel.db").exists()
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite"),
        ("postgres://u:hunter2@db/keel", "postgresql+asyncpg"),
        ("postgresql://u:hunter2@db/keel", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u:hunter2@db/keel", "postgresql+asyncpg"),
    ],
)
async def test_urls_are_rewritten_to_async_drivers_and_redacted(given: str, driver: str, tmp_path: Path) -> None:
    db = Database.from_url(given.replace("x.db", str(tmp_path / "x.db")))
    try:
        assert db.engine.url.drivername == driver
        assert "hunter2" not in db.redacted_url and "hunter2" not in repr(db)
    finally:
        await db.dispose()


async def test_in_memory_sqlite_shares_one_connection() -> None:
    db = Database.from_url("sqlite://")
    try:
        await db.migrate()
        key, secret = await KeyRepository(db).create("alice")
        found = await KeyRepository(db).get_by_secret(secret)
        assert found is not None and found.id == key.id
    finally:
        await db.dispose()


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    url = normalize_url("postgres://u@db/keel?sslmode=require&application_name=keel")
    assert url.drivername == "postgresql+asyncpg" and dict(url.query) == {"ssl": "require", "application_name": "keel"}


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL scheme 'mysql'"):
        Database.from_url("mysql://u@h/db")


async def test_ping(database: Database, postgres_server: PostgresServer) -> None:
    await database.ping()
    dead = Database.from_url(f"postgresql://postgres:secret@127.0.0.1:{postgres_server.port}/no_such_db")
    try:
        with pytest.raises(Exception, match="no_such_db"):
            await dead.ping()
    finally:
        await dead.dispose()


def test_default_sqlite_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    assert default_sqlite_url() == f"sqlite+aiosqlite:///{tmp_path}/home/keel.db"
    monkeypatch.delenv("KEEL_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_sqlite_url() == f"sqlite+aiosqlite:///{tmp_path}/.keel/keel.db"


async def test_datetimes_come_back_aware_utc(database: Database) -> None:
    keys = KeyRepository(database)
    paris = timezone(timedelta(hours=2))
    key, _ = await keys.create("u1", expires_at=datetime(2030, 6, 1, 14, 0, tzinfo=paris))
    got = await keys.get(key.id)
    assert got is not None and got.expires_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    assert got.expires_at.tzinfo == UTC and got.created_at.tzinfo == UTC
    with pytest.raises(InvalidRequest, match="timezone-aware"):
        await keys.create("u1", expires_at=datetime(2030, 1, 1))


# --- Keys ----------------------------------------------------------------------------------------------------


async def test_key_lifecycle(database: Database) -> None:
    keys = KeyRepository(database)
    key, secret = await keys.create(
        "alice", team_id="t1", name="ci", models=["smart"], rpm=60, budget_usd=12.5, budget_period="monthly"
    )
    assert secret.startswith("sk-keel-") and len(secret) == len("sk-keel-") + 40
    assert key.id.startswith("key_") and len(key.id) == 28
    assert key.key_prefix == secret[:12] and key.key_hash == hash_secret(secret)
    assert key.budget_usd_micros == 12_500_000 and key.models == ["smart"] and key.metadata_ == {}
    assert key.is_active()

    found = await keys.get_by_secret(secret)
    assert found is not None and found.id == key.id
    by_hash = await keys.get_by_hash(hash_secret(secret))
    assert by_hash is not None and by_hash.id == key.id
    assert await keys.get_by_secret(secret + "x") is None
    assert await keys.get("key_nope") is None

    other, _ = await keys.create("bob", metadata={"env": "dev"})
    assert {k.id for k in await keys.list()} == {key.id, other.id}
    assert [k.id for k in await keys.list(user_id="alice")] == [key.id]
    assert [k.id for k in await keys.list(team_id="t1")] == [key.id]
    assert len(await keys.list(limit=1)) == 1 and len(await keys.list(limit=1, offset=1)) == 1

    updated = await keys.update(key.id, name="renamed", rpm=None, soft_budget_usd=10, metadata={"a": 1})
    assert updated is not None and updated.name == "renamed" and updated.rpm is None
    assert updated.soft_budget_usd_micros == 10_000_000 and updated.updated_at >= key.updated_at
    reread = await keys.get(key.id)
    assert reread is not None and reread.metadata_ == {"a": 1} and reread.tpm is None
    assert await keys.update("key_nope", name="x") is None

    revoked = await keys.revoke(key.id)
    assert revoked is not None and revoked.revoked_at is not None and not revoked.is_active()
    again = await keys.revoke(key.id)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert [k.id for k in await keys.list()] == [other.id]
    assert {k.id for k in await keys.list(include_revoked=True)} == {key.id, other.id}
    assert await keys.revoke("key_nope") is None


async def test_key_validation(database: Database) -> None:
    keys = KeyRepository(database)
    key, _ = await keys.create("alice", budget_usd=5)
    with pytest.raises(InvalidRequest, match="cannot be changed") as info:
        await keys.update(key.id, user_id="mallory")
    assert info.value.param == "user_id"
    with pytest.raises(InvalidRequest, match="must not exceed"):
        await keys.update(key.id, soft_budget_usd=6)
    with pytest.raises(InvalidRequest, match="budget_period"):
        await keys.create("alice", budget_period="hourly")
    with pytest.raises(InvalidRequest, match="non-negative"):
        await keys.create("alice", budget_usd=-1)
    with pytest.raises(InvalidRequest, match="positive integer"):
        await keys.create("alice", rpm=0)
    with pytest.raises(InvalidRequest, match="list of model names"):
        await keys.create("alice", models="smart")
    unchanged = await keys.get(key.id)
    assert unchanged is not None and unchanged.soft_budget_usd_micros is None
    assert len(await keys.list()) == 1


async def test_secret_is_not_stored(database: Database, tmp_path: Path) -> None:
    _, secret = await KeyRepository(database).create("alice", name="n", metadata={"m": 1})
    random_part = secret[len("sk-keel-") :]
    async with database.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM virtual_keys"))).all()
    assert len(rows) == 1
    values = " ".join(str(v) for v in rows[0])
    assert hash_secret(secret) in values
    assert random_part not in values and random_part[4:] not in values
    if database.dialect == "sqlite":
        await database.dispose()  # checkpoint, then look at the bytes on disk too
        on_disk = await asyncio.to_thread(lambda: b"".join(p.read_bytes() for p in tmp_path.glob("keel.db*")))
        assert on_disk and random_part.encode() not in on_disk


async def test_key_hash_is_unique(database: Database) -> None:
    _, secret = await KeyRepository(database).create("alice")
    with pytest.raises(IntegrityError):
        async with database.session() as session:
            session.add(VirtualKey(user_id="bob", key_hash=hash_secret(secret), key_prefix=secret[:12]))


# --- User and team limits ------------------------------------------------------------------------------------


async def test_scope_limits(database: Database) -> None:
    budgets = ScopeLimitsRepository(database)
    created = await budgets.upsert("user", "alice", limit_usd=100, period="monthly", soft_limit_usd=80, rpm=5)
    assert created.id.startswith("lim_") and created.limit_usd_micros == 100_000_000
    assert created.soft_limit_usd_micros == 80_000_000 and created.rpm == 5

    replaced = await budgets.upsert("user", "alice", limit_usd=50.25, period="daily")
    assert replaced.id == created.id and replaced.created_at == created.created_at
    assert replaced.limit_usd_micros == 50_250_000 and replaced.period == "daily"
    assert replaced.soft_limit_usd_micros is None and replaced.updated_at >= created.updated_at
    assert replaced.rpm is None  # an upsert replaces every limit

    rate_only = await budgets.upsert("user", "carol", tpm=1000, max_parallel=2)
    assert rate_only.limit_usd_micros is None and rate_only.period == "none" and rate_only.max_parallel == 2
    await budgets.delete("user", "carol")

    await budgets.upsert("team", "t1", limit_usd=1000)
    await budgets.upsert("user", "bob", limit_usd=1, period="weekly")
    assert [(b.scope, b.scope_id) for b in await budgets.list()] == [
        ("team", "t1"),
        ("user", "alice"),
        ("user", "bob"),
    ]
    assert [b.scope_id for b in await budgets.list("user")] == ["alice", "bob"]
    got = await budgets.get("user", "alice")
    assert got is not None and got.limit_usd_micros == 50_250_000
    assert await budgets.get("team", "alice") is None

    assert await budgets.delete("user", "alice") is True
    assert await budgets.delete("user", "alice") is False
    assert await budgets.get("user", "alice") is None

    with pytest.raises(InvalidRequest, match="scope must be one of"):
        await budgets.upsert("key", "k", limit_usd=1, period="daily")
    with pytest.raises(InvalidRequest, match="must not exceed"):
        await budgets.upsert("user", "x", limit_usd=1, period="daily", soft_limit_usd=2)
    with pytest.raises(InvalidRequest, match="rpm must be at least 1"):
        await budgets.upsert("user", "x", rpm=0)


# --- Spend ledger --------------------------------------------------------------------------------------------


def spend(request_id: str, at: datetime, cost: int | None, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "created_at": at,
        "route": "openai",
        "model": "smart",
        "status": 200,
        "outcome": "ok",
        "latency_ms": 12.5,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd_micros": cost,
        **fields,
    }


LEDGER = [
    spend("r1", T0 - timedelta(days=1), 100, key_id="k1", user_id="alice", team_id="t1"),
    spend("r2", T0, 200, key_id="k1", user_id="alice", team_id="t1"),
    spend("r3", T0 + timedelta(hours=11, minutes=59), None, key_id="k1", user_id="alice", team_id="t1"),
    spend("r4", T0 + timedelta(hours=12), 400, key_id="k2", user_id="bob", model="cheap"),  # next UTC day
    spend("r5", T0 + timedelta(hours=13), 800, key_id="k3", user_id="carol", team_id="t1", model="cheap"),
]


async def test_spend_totals(database: Database) -> None:
    ledger = SpendRepository(database)
    await ledger.insert_many(LEDGER)
    assert await ledger.total("key", "k1", T0 - timedelta(days=7)) == 300
    assert await ledger.total("key", "k1", T0) == 200  # since is inclusive; the NULL cost adds nothing
    assert await ledger.total("user", "bob", T0) == 400
    assert await ledger.total("team", "t1", T0) == 1000
    assert await ledger.total("global", None, T0 - timedelta(days=7)) == 1500
    assert await ledger.total("global", None, T0 + timedelta(days=7)) == 0
    # a since in another time zone means the same instant
    assert (
        await ledger.total("global", None, (T0 + timedelta(hours=12)).astimezone(timezone(timedelta(hours=-5)))) == 1200
    )
    with pytest.raises(ValueError, match="needs a scope_id"):
        await ledger.total("user", None, T0)


async def test_spend_reports(database: Database) -> None:
    ledger = SpendRepository(database)
    await ledger.insert_many(LEDGER)

    def row(group: str | None, requests: int, cost: int, unpriced: int = 0) -> dict[str, Any]:
        return {
            "group": group,
            "requests": requests,
            "prompt_tokens": 10 * requests,
            "completion_tokens": 5 * requests,
            "cost_usd_micros": cost,
            "unpriced_requests": unpriced,
        }

    assert await ledger.report("key") == [row("k1", 3, 300, 1), row("k2", 1, 400), row("k3", 1, 800)]
    assert await ledger.report("user", T0) == [row("alice", 2, 200, 1), row("bob", 1, 400), row("carol", 1, 800)]
    assert await ledger.report("team") == [row("t1", 4, 1100, 1), row(None, 1, 400)]
    assert await ledger.report("model") == [row("cheap", 2, 1200), row("smart", 3, 300, 1)]
    assert await ledger.report("day") == [
        row("2026-02-28", 1, 100),
        row("2026-03-01", 2, 200, 1),
        row("2026-03-02", 2, 1200),
    ]
    assert await ledger.report("day", T0, T0 + timedelta(hours=12)) == [row("2026-03-01", 2, 200, 1)]  # until exclusive
    assert await ledger.report("model", team_id="t1", key_id="k3") == [row("cheap", 1, 800)]
    assert await ledger.report("day", user_id="nobody") == []


async def test_spend_insert_many_validates_and_fills_defaults(database: Database) -> None:
    ledger = SpendRepository(database)
    with pytest.raises(ValueError, match="record 1: unknown column"):
        await ledger.insert_many([spend("a", T0, 1), spend("b", T0, 1, colour="red")])
    with pytest.raises(ValueError, match=r"record 0: missing required column.*route"):
        await ledger.insert_many([spend("a", T0, 1, route=None)])
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.insert_many([spend("a", T0.replace(tzinfo=None), 1)])
    refused = {"request_id": "m", "route": "r", "status": 400, "outcome": "error", "latency_ms": 1.0}
    await ledger.insert_many([refused | {"model": None, "prompt_tokens": None}])  # None: the column's default
    await ledger.insert_many([])
    assert await ledger.report("model") == [
        {
            "group": None,
            "requests": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd_micros": 0,
            "unpriced_requests": 1,
        }
    ]


async def test_sqlite_ledger_batch_stores_what_an_executemany_would(tmp_path: Path) -> None:
    """On SQLite a batch goes in as one JSON parameter (see spend.py); every value must land with the same text
    and SQLite type as SQLAlchemy's own executemany writes it, or reads and sums would differ between the two."""
    odd = spend("é ünï \" '", T0.astimezone(timezone(timedelta(hours=5))), 2**53 + 1, latency_ms=0.1, key_id="k")
    records = [spend("a", T0, 300), spend("b", T0 + timedelta(microseconds=7), None, prompt_version=3), odd]
    stored = []
    for name in ("json", "executemany"):
        db = Database.from_url(f"sqlite+aiosqlite:///{tmp_path / name}.db")
        await db.migrate()
        if name == "json":
            await SpendRepository(db).insert_many(records)
        else:
            rows = [_row(i, r, T0) for i, r in enumerate(records)]
            async with db.engine.begin() as conn:
                await conn.execute(insert(SpendRecord), rows)
        columns = [c.name for c in SpendRecord.__table__.columns]
        typed = ", ".join(f"{c}, typeof({c})" for c in columns)
        async with db.engine.connect() as conn:
            stored.append((await conn.exec_driver_sql(f"SELECT {typed} FROM spend_records ORDER BY id")).all())
        await db.dispose()
    assert len(stored[0]) == 3
    assert stored[0] == stored[1]


# --- BatchWriter ---------------------------------------------------------------------------------------------


class Sink:
    """Records batches; fails the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.failures = failures
        self.calls = 0

    async def __call__(self, batch: Sequence[int]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("database down")
        self.batches.append(list(batch))

    @property
    def items(self) -> list[int]:
        return [i for b in self.batches for i in b]


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_writer_flushes_full_batches_without_waiting_for_the_interval() -> None:
    sink = Sink()
    writer = BatchWriter(sink, interval_s=60, max_batch=10)
    await writer.start()
    for i in range(25):
        writer.put(i)
    await wait_for(lambda: writer.written == 25)  # woken by a full batch, it writes all that is pending
    assert sink.batches == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    for i in range(25, 28):
        writer.put(i)
    await asyncio.sleep(0.05)
    assert writer.pending == 3  # less than a batch waits for the interval
    await writer.stop()
    assert sink.items == list(range(28)) and writer.pending == 0 and writer.written == 28


async def test_writer_flushes_every_interval() -> None:
    sink = Sink()
    writer = BatchWriter(sink, interval_s=0.05, max_batch=100)
    await writer.start()
    writer.put(1)
    started = time.monotonic()
    await wait_for(lambda: sink.items == [1])
    assert 0.03 < time.monotonic() - started < 1
    writer.put(2)
    await wait_for(lambda: sink.items == [1, 2])
    await writer.stop()


async def test_writer_keeps_and_retries_a_failed_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keel.store")
    sink = Sink(failures=3)
    writer = BatchWriter(sink, interval_s=0.01, max_batch=4, max_backoff_s=0.05)
    await writer.start()
    for i in range(10):
        writer.put(i)
    await wait_for(lambda: writer.written == 10)
    assert sink.calls == 3 + 3 and sink.items == list(range(10)) and writer.dropped == 0
    assert "sink failed (attempt 3)" in caplog.text and "recovered after 3" in caplog.text
    await writer.stop()


async def test_writer_stop_flushes_everything_left() -> None:
    sink = Sink()
    writer = BatchWriter(sink, interval_s=60, max_batch=500)
    await writer.start()
    for i in range(1234):
        writer.put(i)
    await writer.stop()
    assert sink.items == list(range(1234)) and [len(b) for b in sink.batches] == [500, 500, 234]


async def test_writer_counts_and_logs_drops_when_too_much_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(failures=10**9)
    writer = BatchWriter(sink, interval_s=60, max_batch=5, max_pending=10)
    with caplog.at_level(logging.ERROR, logger="keel.store"):
        for i in range(25):
            writer.put(i)  # no task running: nothing is written
    assert writer.pending == 10 and writer.dropped == 15
    drops = [r for r in caplog.records if "DROPPED" in r.getMessage()]
    assert len(drops) == 1  # once per interval, not once per item

    # stop gives up on a sink that keeps failing, and says how much was lost
    await writer.stop(timeout_s=0.1)
    assert writer.pending == 0 and writer.dropped == 25
    assert "stopped before they could be written" in caplog.text


async def test_writer_flush_raises_and_keeps_items() -> None:
    sink = Sink(failures=1)
    writer: BatchWriter[int] = BatchWriter(sink, max_batch=2)
    writer.put(1)
    with pytest.raises(ConnectionError):
        await writer.flush()
    assert writer.pending == 1
    await writer.flush()
    assert sink.items == [1] and writer.pending == 0


async def test_writer_sets_aside_only_the_items_the_sink_rejects(caplog: pytest.LogCaptureFixture) -> None:
    written: list[int] = []

    async def sink(batch: Sequence[int]) -> None:
        if any(i < 0 for i in batch):
            raise ValueError("negative item")
        written.extend(batch)

    writer = BatchWriter(sink, max_batch=4)
    for i in [0, 1, -1, 2, 3, 4, -2, 5]:
        writer.put(i)
    await writer.flush()
    assert written == [0, 1, 2, 3, 4, 5] and writer.dropped == 2 and writer.written == 6 and writer.pending == 0
    assert "rejected by the sink: negative item" in caplog.text


async def test_writer_into_the_spend_ledger(database: Database) -> None:
    ledger = SpendRepository(database)
    writer = BatchWriter(ledger.insert_many, interval_s=0.05, max_batch=100)
    await writer.start()
    for i in range(250):
        writer.put(spend(f"w{i}", T0, 2, key_id="kw"))
    writer.put(spend("bad", T0, 1000, key_id="kw", colour="red"))  # a bug upstream must not stall the ledger
    writer.put(spend("last", T0, 3, key_id="kw"))
    await writer.stop()
    assert writer.written == 251 and writer.dropped == 1
    assert await ledger.total("key", "kw", T0) == 503
