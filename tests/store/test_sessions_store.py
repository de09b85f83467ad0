"""The session repository on SQLite and PostgreSQL: ownership, numbering, one turn at a time (also across
"workers", i.e. repositories with their own engines on one database), retention."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from keel.errors import InvalidRequest, NotFound
from keel.store import Database
from keel.store.models import ChatMessage, ChatSession, utcnow
from keel.store.sessions import SessionRepository


async def count_messages(db: Database, session_id: str | None = None) -> int:
    stmt = select(func.count()).select_from(ChatMessage)
    if session_id is not None:
        stmt = stmt.where(ChatMessage.session_id == session_id)
    async with db.session() as s:
        return int(await s.scalar(stmt) or 0)


async def test_ownership_is_enforced_in_every_query(database: Database) -> None:
    repo = SessionRepository(database)
    mine = await repo.create("user:alice", "phone", key_id="key_a", user_id="alice")
    assert mine.id.startswith("ses_") and mine.owner == "user:alice"
    turn = await repo.begin_turn("user:alice", mine.id, "hello")
    await repo.complete(turn, "hi")
    for call in (
        repo.get("user:bob", mine.id),
        repo.messages("user:bob", mine.id),
        repo.range("user:bob", mine.id, 0, 10),
        repo.set_pinned("user:bob", mine.id, 1, True),
        repo.delete("user:bob", mine.id),
        repo.begin_turn("user:bob", mine.id, "let me in"),
        repo.get("user:alice", "ses_does_not_exist"),
    ):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.status == 404
    assert not await repo.save_summary("user:bob", mine.id, "stolen", 2, previous_upto=0)
    assert await repo.list("user:bob") == []
    assert [s.id for s in await repo.list("user:alice")] == [mine.id]
    assert await repo.delete_all("user:bob") == 0
    assert [(m.seq, m.role, m.content) for m in await repo.messages("user:alice", mine.id)] == [
        (1, "user", "hello"),
        (2, "assistant", "hi"),
    ]


async def test_turns_number_messages_and_keep_history(database: Database) -> None:
    repo = SessionRepository(database)
    row = await repo.create("anonymous", "phone")
    for i in range(3):
        turn = await repo.begin_turn("anonymous", row.id, f"q{i}", pinned=i == 0)
        assert turn.user_seq == 2 * i + 1 and [m.seq for m in turn.history] == list(range(1, 2 * i + 1))
        await repo.complete(turn, f"a{i}", tokens=3, metadata={"citations": [{"id": "doc"}]})
    fresh = await repo.get("anonymous", row.id)
    assert fresh.last_seq == 6 and fresh.title == "q0" and fresh.last_message_at is not None
    answer = (await repo.messages("anonymous", row.id, after=5))[0]
    assert answer.metadata_ == {"citations": [{"id": "doc"}]} and answer.tokens == 3
    # with a summary covering 1..4, the next turn sees the pinned first question and messages after the summary
    assert await repo.save_summary("anonymous", row.id, "the gist", 4, previous_upto=0)
    assert not await repo.save_summary("anonymous", row.id, "older start", 5, previous_upto=0)
    turn = await repo.begin_turn("anonymous", row.id, "q3")
    assert [m.seq for m in turn.history] == [1, 5, 6] and turn.session.summary == "the gist"
    await repo.discard(turn)
    assert (await repo.get("anonymous", row.id)).last_seq == 6  # discarded numbers are given back


async def test_failed_message_is_retried_not_duplicated(database: Database) -> None:
    repo = SessionRepository(database)
    row = await repo.create("master", "phone")
    turn = await repo.begin_turn("master", row.id, "what is USB-C?")
    await repo.fail(turn, {"code": "upstream_error"})
    [failed] = await repo.messages("master", row.id)
    assert failed.status == "failed" and failed.metadata_["error"] == {"code": "upstream_error"}
    retry = await repo.begin_turn("master", row.id, "what is USB-C?")
    assert retry.reused and retry.user_seq == 1
    await repo.discard(retry)  # refused again: a retried message is kept, still failed
    retry = await repo.begin_turn("master", row.id, "what is USB-C?")
    await repo.complete(retry, "a connector")
    assert [(m.seq, m.status) for m in await repo.messages("master", row.id)] == [(1, "ok"), (2, "ok")]
    # different text after a failure is a new message
    turn = await repo.begin_turn("master", row.id, "first")
    await repo.fail(turn, {"code": "x"})
    turn = await repo.begin_turn("master", row.id, "second")
    assert not turn.reused and turn.user_seq == 4
    await repo.complete(turn, "ok")


@pytest.mark.parametrize("workers", [1, 3])
async def test_turns_on_one_session_never_overlap(database: Database, workers: int) -> None:
    """Each repository stands for a worker: its own engine (connection pool) on the same database."""
    engines = [Database.from_url(database.engine.url) for _ in range(workers)]
    repos = [SessionRepository(db) for db in engines]
    try:
        row = await repos[0].create("anonymous", "phone")
        log: list[str] = []

        async def send(i: int) -> None:
            repo = repos[i % workers]
            turn = await repo.begin_turn("anonymous", row.id, f"m{i}")
            log.append(f"start {i}")
            assert len(turn.history) == len(log) - 1  # every earlier turn, answered
            await asyncio.sleep(0.01)
            log.append(f"end {i}")
            await repo.complete(turn, f"r{i}")

        await asyncio.gather(*(send(i) for i in range(8)))
        assert all(log[k].split()[1] == log[k + 1].split()[1] for k in range(0, len(log), 2))  # start/end pairs
        messages = await repos[0].messages("anonymous", row.id)
        assert [m.seq for m in messages] == list(range(1, 17))
        assert [m.role for m in messages] == ["user", "assistant"] * 8
        assert all(a.content == "r" + u.content[1:] for u, a in zip(messages[::2], messages[1::2], strict=True))
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_dead_workers_lease_expires(database: Database) -> None:
    crashed = SessionRepository(database, lease_s=0.3)
    other = SessionRepository(database, lease_s=0.3, wait_s=0.05)
    row = await crashed.create("anonymous", "phone")
    turn = await crashed.begin_turn("anonymous", row.id, "hello")
    assert turn._renewal is not None
    turn._renewal.cancel()  # the worker dies mid-turn: nobody renews or releases the lease
    with pytest.raises(InvalidRequest) as info:
        await other.begin_turn("anonymous", row.id, "anyone?")
    assert info.value.status == 409 and info.value.code == "session_busy"
    await asyncio.sleep(0.35)
    taken = await other.begin_turn("anonymous", row.id, "anyone?")
    assert taken.user_seq == 2
    await other.complete(taken, "yes")


async def test_waiting_for_a_busy_session_is_bounded_in_one_worker_too(database: Database) -> None:
    repo = SessionRepository(database, wait_s=0.1)
    row = await repo.create("anonymous", "phone")
    turn = await repo.begin_turn("anonymous", row.id, "slow question")
    with pytest.raises(InvalidRequest) as info:
        await repo.begin_turn("anonymous", row.id, "impatient")
    assert info.value.code == "session_busy" and info.value.retry_after == 2
    await repo.complete(turn, "answer")
    await repo.complete(await repo.begin_turn("anonymous", row.id, "now"), "ok")
    assert repo._gates == {}  # nothing held once turns are over


async def test_a_long_turn_renews_its_lease(database: Database) -> None:
    repo = SessionRepository(database, lease_s=0.3)
    other = SessionRepository(database, lease_s=0.3, wait_s=0.05)
    row = await repo.create("anonymous", "phone")
    turn = await repo.begin_turn("anonymous", row.id, "long answer please")
    await asyncio.sleep(0.7)  # more than two leases
    with pytest.raises(InvalidRequest):
        await other.begin_turn("anonymous", row.id, "me next")
    await repo.complete(turn, "done")
    await other.complete(await other.begin_turn("anonymous", row.id, "me next"), "ok")


async def test_deleting_cascades_and_retention_purges_idle_sessions(database: Database) -> None:
    repo = SessionRepository(database)
    idle, fresh, empty_old, empty_new = [await repo.create("anonymous", "phone") for _ in range(4)]
    for row in (idle, fresh):
        turn = await repo.begin_turn("anonymous", row.id, "hi")
        await repo.complete(turn, "hello")
    long_ago = utcnow() - timedelta(days=40)
    async with database.session() as s:
        await s.execute(update(ChatSession).where(ChatSession.id == idle.id).values(last_message_at=long_ago))
        await s.execute(update(ChatSession).where(ChatSession.id == empty_old.id).values(created_at=long_ago))
    assert await repo.purge_inactive(utcnow() - timedelta(days=30), batch=1) == 2
    assert {s.id for s in await repo.list("anonymous")} == {fresh.id, empty_new.id}
    assert await count_messages(database, idle.id) == 0 and await count_messages(database) == 2
    await repo.delete("anonymous", fresh.id)
    assert await count_messages(database) == 0
    assert await repo.delete_all("anonymous") == 1
