"""Chat sessions: ownership, message numbering, one turn at a time per session, retention.

Every query names the owner, so a session that belongs to someone else is indistinguishable from one that does
not exist (:class:`~keel.errors.NotFound`, 404). Owners are strings from :func:`owner_of`.

A *turn* (a user message and its answer) holds the session for its whole length, model call and stream included,
so two messages sent at once are answered one after the other, the second seeing the first's answer:

- within a worker, an :class:`asyncio.Lock` per session (kept only while a turn runs or waits), so waiters are
  served first come, first served without touching the database;
- across workers, a lease on the session row (``turn_token``, ``turn_expires_at``), taken with one conditional
  ``UPDATE`` and renewed while the turn runs. A lease, not ``pg_advisory_xact_lock``: that would pin a pooled
  connection for the length of every stream, and the pool would cap concurrent chats. A worker that dies
  mid-turn frees the session when its lease expires (:data:`LEASE_S`). Works the same on SQLite and PostgreSQL.

Message numbers (``seq``) come from ``UPDATE ... SET last_seq = last_seq + 1 RETURNING``, atomic on both
databases whatever the lease does, and ``(session_id, seq)`` is the primary key: nothing is numbered twice.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import and_, case, delete, exists, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keel.errors import InvalidRequest, NotFound
from keel.store.db import Database
from keel.store.models import ChatMessage, ChatSession, utcnow

if TYPE_CHECKING:
    from keel.pipeline.auth import Principal

__all__ = ["LEASE_S", "HistoryRow", "RetentionSweeper", "SessionRepository", "Turn", "owner_of", "user_owner"]

log = logging.getLogger("keel.sessions")

LEASE_S: Final = 60.0  # a crashed worker holds a session at most this long
WAIT_S: Final = 120.0  # how long a message waits for the turn before it is refused as busy (409)
MAX_HISTORY: Final = 2000  # newest messages considered when building a prompt (pinned ones come on top)
TITLE_CHARS: Final = 80
_POLL_S: Final = (0.02, 0.5)  # lease polling backoff, first and longest sleep

_background: set[asyncio.Task[None]] = set()


def owner_of(principal: Principal) -> str:
    """Who owns what a principal creates: the key's user (keys rotate, the user stays), ``master`` or
    ``anonymous`` (open mode)."""
    return user_owner(principal.user_id or "") if principal.kind == "key" else principal.kind


def user_owner(user_id: str) -> str:
    return f"user:{user_id}"


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"No session {session_id!r}. List yours with GET /v1/sessions.", param="session_id")


def _busy() -> InvalidRequest:
    return InvalidRequest(
        "This session is still answering earlier messages; retry shortly.",
        code="session_busy",
        status=409,
        retry_after=2,
    )


@dataclass(slots=True)
class _Gate:
    """The in-process lock of one session and how many turns hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """A message as a prompt needs it (lighter to load than a :class:`ChatMessage`)."""

    seq: int
    role: str
    content: str
    pinned: bool


@dataclass(slots=True)
class Turn:
    """A turn in progress: the session as it was when the turn began, the saved user message and the history
    before it (messages after the summary, and pinned ones from before it; oldest first). End it with exactly one of
    :meth:`SessionRepository.complete`, :meth:`~SessionRepository.fail`, :meth:`~SessionRepository.discard`;
    :meth:`SessionRepository.abandon` is the safety net for paths being cancelled."""

    session: ChatSession
    user_seq: int
    history: list[HistoryRow]
    reused: bool  # the user message is an earlier failed one, being retried
    token: str
    _gate: _Gate
    _renewal: asyncio.Task[None] | None = None
    done: bool = False


class SessionRepository:
    """Sessions and messages in the database, plus the per-session turn lock (see the module docstring)."""

    def __init__(self, db: Database, *, lease_s: float = LEASE_S, wait_s: float = WAIT_S) -> None:
        self._db = db
        self._lease_s = lease_s
        self._wait_s = wait_s
        self._gates: dict[str, _Gate] = {}

    # -- sessions ------------------------------------------------------------------------------------------------

    async def create(
        self,
        owner: str,
        app: str,
        *,
        key_id: str | None = None,
        user_id: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ChatSession:
        row = ChatSession(
            app=app, owner=owner, key_id=key_id, user_id=user_id, title=title, metadata_=dict(metadata or {})
        )
        async with self._db.session() as s:
            s.add(row)
        return row

    async def get(self, owner: str, session_id: str) -> ChatSession:
        async with self._db.session() as s:
            return await _owned(s, owner, session_id)

    async def list(self, owner: str, *, limit: int = 20, offset: int = 0) -> builtins.list[ChatSession]:
        """The owner's sessions, newest first."""
        stmt = (
            select(ChatSession)
            .where(ChatSession.owner == owner)
            .order_by(ChatSession.created_at.desc(), ChatSession.id.desc())
            .limit(limit)
            .offset(offset)
        )
        async with self._db.session() as s:
            return builtins.list(await s.scalars(stmt))

    async def delete(self, owner: str, session_id: str) -> None:
        """Delete a session and its messages (the foreign key cascades)."""
        async with self._db.session() as s:
            result = await s.execute(
                delete(ChatSession).where(ChatSession.id == session_id, ChatSession.owner == owner)
            )
        if _rowcount(result) == 0:
            raise _not_found(session_id)

    async def delete_all(self, owner: str) -> int:
        """Delete every session of an owner ("delete my data"); returns how many there were."""
        async with self._db.session() as s:
            return _rowcount(await s.execute(delete(ChatSession).where(ChatSession.owner == owner)))

    async def purge_inactive(self, before: datetime, *, batch: int = 500) -> int:
        """Delete sessions with no activity since ``before`` (their last message, or their creation when they
        have none), in batches so no transaction grows large; returns how many."""
        idle = or_(
            ChatSession.last_message_at < before,
            and_(ChatSession.last_message_at.is_(None), ChatSession.created_at < before),
        )
        total = 0
        while True:
            async with self._db.session() as s:
                ids = builtins.list(await s.scalars(select(ChatSession.id).where(idle).limit(batch)))
                if ids:
                    await s.execute(delete(ChatSession).where(ChatSession.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total

    async def save_summary(self, owner: str, session_id: str, summary: str, upto: int, *, previous_upto: int) -> bool:
        """Store a summary covering messages up to ``upto``, unless another one moved on meanwhile (a summary
        written from an older starting point is dropped, never stored over a newer one)."""
        async with self._db.session() as s:
            result = await s.execute(
                update(ChatSession)
                .where(
                    ChatSession.id == session_id,
                    ChatSession.owner == owner,
                    ChatSession.summary_upto == previous_upto,
                )
                .values(summary=summary, summary_upto=upto)
            )
        return _rowcount(result) == 1

    # -- messages ------------------------------------------------------------------------------------------------

    async def messages(
        self, owner: str, session_id: str, *, after: int = 0, limit: int = 100
    ) -> builtins.list[ChatMessage]:
        """Messages with ``seq > after``, oldest first (export, paginated by ``after``)."""
        async with self._db.session() as s:
            await _owned(s, owner, session_id)
            stmt = (
                select(ChatMessage)
                .where(ChatMessage.session_id == session_id, ChatMessage.seq > after)
                .order_by(ChatMessage.seq)
                .limit(limit)
            )
            return builtins.list(await s.scalars(stmt))

    async def range(self, owner: str, session_id: str, after: int, upto: int) -> builtins.list[ChatMessage]:
        """Messages ``after < seq <= upto``, oldest first: what a summary folds in."""
        async with self._db.session() as s:
            await _owned(s, owner, session_id)
            stmt = (
                select(ChatMessage)
                .where(ChatMessage.session_id == session_id, ChatMessage.seq > after, ChatMessage.seq <= upto)
                .order_by(ChatMessage.seq)
            )
            return builtins.list(await s.scalars(stmt))

    async def set_pinned(self, owner: str, session_id: str, seq: int, pinned: bool) -> ChatMessage:
        """Pin (never dropped from the prompt) or unpin a message."""
        async with self._db.session() as s:
            await _owned(s, owner, session_id)
            message = await s.get(ChatMessage, (session_id, seq), with_for_update=True)
            if message is None:
                raise NotFound(f"Session {session_id!r} has no message {seq}.", param="seq")
            message.pinned = pinned
        return message

    # -- turns ---------------------------------------------------------------------------------------------------

    async def begin_turn(
        self, owner: str, session_id: str, content: str, *, pinned: bool = False, request_id: str | None = None
    ) -> Turn:
        """Wait for the session's turn, save the user message and load the history before it.

        Sending the same text as the session's last message, a user message whose answer failed, retries that
        message instead of saving it twice. Raises :class:`NotFound`, or ``InvalidRequest`` 409 ``session_busy``
        when another worker holds the session longer than the wait allows.
        """
        deadline = asyncio.get_running_loop().time() + self._wait_s
        gate = self._gates.setdefault(session_id, _Gate())
        gate.users += 1
        try:
            async with asyncio.timeout_at(deadline):
                await gate.lock.acquire()
        except BaseException as exc:
            self._leave(session_id, gate)
            if isinstance(exc, TimeoutError):
                raise _busy() from None
            raise
        try:
            turn = await self._lease_and_start(owner, session_id, content, pinned, request_id, gate, deadline)
        except BaseException:
            gate.lock.release()
            self._leave(session_id, gate)
            raise
        turn._renewal = asyncio.get_running_loop().create_task(self._renew(turn))
        return turn

    async def complete(
        self,
        turn: Turn,
        content: str,
        *,
        tokens: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        question_tokens: int | None = None,
    ) -> ChatMessage:
        """Save the answer, mark the user message answered (with ``question_tokens``, its cost in the prompt), end
        the turn. Raises :class:`NotFound` if the session was deleted meanwhile."""
        sid = turn.session.id
        try:
            async with self._db.session() as s:
                mine = ChatSession.turn_token == turn.token
                seq = await s.scalar(
                    update(ChatSession)
                    .where(ChatSession.id == sid)
                    .values(
                        last_seq=ChatSession.last_seq + 1,
                        last_message_at=utcnow(),
                        turn_token=case((mine, None), else_=ChatSession.turn_token),
                        turn_expires_at=case((mine, None), else_=ChatSession.turn_expires_at),
                    )
                    .returning(ChatSession.last_seq)
                )
                if seq is None:
                    raise _not_found(sid)
                await s.execute(
                    update(ChatMessage)
                    .where(ChatMessage.session_id == sid, ChatMessage.seq == turn.user_seq)
                    .values(status="ok", tokens=question_tokens)
                )
                answer = ChatMessage(
                    session_id=sid,
                    seq=seq,
                    role="assistant",
                    content=content,
                    pinned=False,
                    status="ok",
                    tokens=tokens,
                    request_id=request_id,
                    metadata_=dict(metadata or {}),
                    created_at=utcnow(),
                )
                await s.execute(insert(ChatMessage).values(_columns(answer)))  # no unit-of-work flush
        finally:
            self._free(turn)
        return answer

    async def fail(self, turn: Turn, error: Mapping[str, Any]) -> None:
        """The answer never completed: keep the user message, marked ``failed`` with ``error``, so sending it
        again retries it; end the turn."""
        try:
            async with self._db.session() as s:
                message = await s.get(ChatMessage, (turn.session.id, turn.user_seq), with_for_update=True)
                if message is not None:
                    message.status = "failed"
                    message.metadata_ = {**message.metadata_, "error": dict(error)}
                await _unlease(s, turn.session.id, turn.token)
        finally:
            self._free(turn)

    async def discard(self, turn: Turn) -> None:
        """The request was refused before any model saw it: forget the user message (unless it was a retry of
        an earlier one) and give its number back, so the session reads as if it had not been sent."""
        try:
            async with self._db.session() as s:
                if not turn.reused:
                    await s.execute(
                        delete(ChatMessage).where(
                            ChatMessage.session_id == turn.session.id, ChatMessage.seq == turn.user_seq
                        )
                    )
                    await s.execute(
                        update(ChatSession)
                        .where(ChatSession.id == turn.session.id, ChatSession.last_seq == turn.user_seq)
                        .values(last_seq=turn.user_seq - 1)
                    )
                await _unlease(s, turn.session.id, turn.token)
        finally:
            self._free(turn)

    def abandon(self, turn: Turn, error: Mapping[str, Any]) -> None:
        """End a turn from a path being cancelled (client gone) or that never ran (a response never started):
        the session is free in this worker at once; :meth:`fail` runs in a task of its own. No-op once ended."""
        if turn.done:
            return
        task = asyncio.get_running_loop().create_task(self.fail(turn, error))
        _background.add(task)
        task.add_done_callback(_background.discard)
        self._free(turn)

    # -- internals -----------------------------------------------------------------------------------------------

    async def _lease_and_start(
        self,
        owner: str,
        session_id: str,
        content: str,
        pinned: bool,
        request_id: str | None,
        gate: _Gate,
        deadline: float,
    ) -> Turn:
        """Take the session's lease (polling while another worker holds it) and start the turn, in one
        transaction: if starting fails, the lease was never taken."""
        token = secrets.token_hex(16)
        title = " ".join(content.split())[:TITLE_CHARS]
        loop = asyncio.get_running_loop()
        pause = _POLL_S[0]
        while True:
            now = utcnow()
            async with self._db.session() as s:
                row = await s.scalar(
                    update(ChatSession)
                    .where(
                        ChatSession.id == session_id,
                        ChatSession.owner == owner,
                        or_(ChatSession.turn_token.is_(None), ChatSession.turn_expires_at < now),
                    )
                    .values(
                        turn_token=token,
                        turn_expires_at=now + timedelta(seconds=self._lease_s),
                        title=func.coalesce(ChatSession.title, title),
                        last_message_at=now,
                    )
                    .returning(ChatSession)
                )
                if row is not None:
                    return await self._start(s, row, token, content, pinned, request_id, gate)
                found = await s.scalar(select(exists().where(ChatSession.id == session_id, ChatSession.owner == owner)))
            if not found:
                raise _not_found(session_id)
            if loop.time() + pause > deadline:
                raise _busy()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_S[1])

    async def _start(
        self,
        s: AsyncSession,
        row: ChatSession,
        token: str,
        content: str,
        pinned: bool,
        request_id: str | None,
        gate: _Gate,
    ) -> Turn:
        """Load the history (newest first: it starts with the session's last message) and save the user message,
        or reuse the last one when it is this same message, failed."""
        m = ChatMessage
        stmt = (
            select(m.seq, m.role, m.content, m.pinned, m.status)
            .where(m.session_id == row.id, or_(m.seq > row.summary_upto, m.pinned))
            .order_by(m.seq.desc())
            .limit(MAX_HISTORY)
        )
        rows = list(await s.execute(stmt))
        last = rows[0] if rows and rows[0].seq == row.last_seq else None
        reused = last is not None and last.role == "user" and last.status == "failed" and last.content == content
        if reused:
            assert last is not None
            seq = last.seq
            rows = rows[1:]
            changes: dict[str, Any] = {"request_id": request_id} | ({"pinned": True} if pinned else {})
            await s.execute(update(m).where(m.session_id == row.id, m.seq == seq).values(**changes))
        else:
            allocated = await _next_seq(s, row.id)
            assert allocated is not None, "the session row is leased to this turn"
            seq = allocated
            await s.execute(
                insert(m).values(
                    session_id=row.id, seq=seq, role="user", content=content, pinned=pinned, request_id=request_id
                )
            )
        history = [HistoryRow(n, role, text, pin) for n, role, text, pin, _ in reversed(rows)]
        return Turn(session=row, user_seq=seq, history=history, reused=reused, token=token, _gate=gate)

    async def _renew(self, turn: Turn) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                async with self._db.session() as s:
                    result = await s.execute(
                        update(ChatSession)
                        .where(ChatSession.id == turn.session.id, ChatSession.turn_token == turn.token)
                        .values(turn_expires_at=utcnow() + timedelta(seconds=self._lease_s))
                    )
            except Exception:
                log.exception("could not renew the turn lease of session %s", turn.session.id)
                continue
            if _rowcount(result) == 0:
                log.warning("session %s: turn lease lost (session deleted, or the turn ran past it)", turn.session.id)
                return

    def _free(self, turn: Turn) -> None:
        if turn.done:
            return
        turn.done = True
        if turn._renewal is not None:
            turn._renewal.cancel()
        turn._gate.lock.release()
        self._leave(turn.session.id, turn._gate)

    def _leave(self, session_id: str, gate: _Gate) -> None:
        gate.users -= 1
        if gate.users == 0 and self._gates.get(session_id) is gate:
            del self._gates[session_id]


async def _owned(s: AsyncSession, owner: str, session_id: str) -> ChatSession:
    row = await s.scalar(select(ChatSession).where(ChatSession.id == session_id, ChatSession.owner == owner))
    if row is None:
        raise _not_found(session_id)
    return row


async def _next_seq(s: AsyncSession, session_id: str) -> int | None:
    """Allocate the next message number atomically (the row update also serializes concurrent writers)."""
    result = await s.execute(
        update(ChatSession)
        .where(ChatSession.id == session_id)
        .values(last_seq=ChatSession.last_seq + 1, last_message_at=utcnow())
        .returning(ChatSession.last_seq)
    )
    seq = result.scalar_one_or_none()
    return None if seq is None else int(seq)


def _columns(row: ChatMessage) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in ChatMessage.__mapper__.column_attrs}


async def _unlease(s: AsyncSession, session_id: str, token: str) -> None:
    await s.execute(
        update(ChatSession)
        .where(ChatSession.id == session_id, ChatSession.turn_token == token)
        .values(turn_token=None, turn_expires_at=None)
    )


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


class RetentionSweeper:
    """Deletes sessions idle for longer than ``max_age_days`` (``sessions.retention_days``): at start, then every
    ``interval_s``. Every worker may run one; deleting is idempotent."""

    def __init__(self, repo: SessionRepository, max_age_days: float | None, *, interval_s: float = 3600.0) -> None:
        self.repo = repo
        self.max_age_days = max_age_days
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        if self.max_age_days is None:
            return 0
        deleted = await self.repo.purge_inactive(utcnow() - timedelta(days=self.max_age_days))
        if deleted:
            log.info("retention: deleted %d sessions idle for over %g days", deleted, self.max_age_days)
        return deleted

    async def start(self) -> None:
        if self.max_age_days is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="session retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed; retrying in %gs", self.interval_s)
            await asyncio.sleep(self.interval_s)
