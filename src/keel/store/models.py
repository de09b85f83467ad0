"""Keel's tables as SQLAlchemy 2 typed models, written once for SQLite and PostgreSQL alike.

Portable on purpose: ``JSON`` (stored as JSONB on PostgreSQL), money as integer micro-dollars in ``BigInteger``
(1 USD = 1_000_000; floats never hold money), and :class:`UTCDateTime`, which stores UTC and always hands back
timezone-aware datetimes (SQLite has no time zones; without it the two databases would return different
objects). Every schema change here needs an Alembic revision in ``migrations/versions``; the tests compare the
migrated schema with these models.
"""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from keel.errors import InvalidRequest

__all__ = [
    "BUDGET_PERIODS",
    "LIMIT_SCOPES",
    "MICROS_PER_USD",
    "Base",
    "ChatMessage",
    "ChatSession",
    "ScopeLimits",
    "SpendRecord",
    "UTCDateTime",
    "VirtualKey",
    "check_period",
    "check_soft_limit",
    "usd_to_micros",
    "utcnow",
]

BUDGET_PERIODS: Final = ("daily", "weekly", "monthly", "none")
LIMIT_SCOPES: Final = ("user", "team")
MICROS_PER_USD: Final = 1_000_000

# Deterministic constraint names, so later migrations (and SQLite batch rebuilds) can refer to them.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_JSON = JSON().with_variant(JSONB(), "postgresql")
# SQLite autoincrements only an INTEGER PRIMARY KEY (its 64-bit rowid); BIGINT there would stay NULL.
_BIGINT_PK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def usd_to_micros(usd: float | None, field: str) -> int | None:
    """Dollars as given by people and config to the integer micro-dollars stored; refuses negative amounts."""
    if usd is None:
        return None
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) or usd < 0:
        raise InvalidRequest(f"{field} must be a non-negative number of US dollars, got {usd!r}", param=field)
    return round(usd * MICROS_PER_USD)


def check_period(period: str, field: str) -> str:
    if period not in BUDGET_PERIODS:
        raise InvalidRequest(f"{field} must be one of {', '.join(BUDGET_PERIODS)}, got {period!r}", param=field)
    return period


def check_soft_limit(limit: int | None, soft: int | None, field: str) -> None:
    """A soft limit warns before the hard one refuses, so it cannot lie above it."""
    if limit is not None and soft is not None and soft > limit:
        raise InvalidRequest(f"{field} must not exceed the hard budget", param=field)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database. Naive datetimes are refused rather than guessed at."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; pass a timezone-aware one (tz=UTC)")
        value = value.astimezone(UTC)
        # SQLite stores text without an offset; a fixed UTC rendering keeps comparisons on the column correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: _JSON, list[str]: _JSON}


def _periods_check(column: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(p) for p in BUDGET_PERIODS)})", name=f"{column}_valid")


class VirtualKey(Base):
    """An API key Keel issues. Only the SHA-256 of the secret is stored; the secret is shown once, at creation."""

    __tablename__ = "virtual_keys"
    __table_args__ = (_periods_check("budget_period"),)

    id: Mapped[str] = mapped_column(primary_key=True, default=lambda: "key_" + secrets.token_hex(12))
    key_hash: Mapped[str] = mapped_column(unique=True, index=True)
    key_prefix: Mapped[str]
    name: Mapped[str | None]
    user_id: Mapped[str] = mapped_column(index=True)
    team_id: Mapped[str | None] = mapped_column(index=True)
    models: Mapped[list[str]] = mapped_column(default=list)
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    max_parallel: Mapped[int | None]
    budget_usd_micros: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str] = mapped_column(default="none")
    soft_budget_usd_micros: Mapped[int | None] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def is_active(self, now: datetime | None = None) -> bool:
        """Not revoked and not expired: whether a request may authenticate with this key."""
        now = now or utcnow()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def __repr__(self) -> str:
        return f"VirtualKey(id={self.id!r}, prefix={self.key_prefix!r}, user_id={self.user_id!r})"


class ScopeLimits(Base):
    """A user's or a team's budget and rate limits; each field ``None`` = no limit of that kind. A key's own
    limits live on :class:`VirtualKey`."""

    __tablename__ = "scope_limits"
    __table_args__ = (
        UniqueConstraint("scope", "scope_id"),
        CheckConstraint(f"scope IN ({', '.join(repr(s) for s in LIMIT_SCOPES)})", name="scope_valid"),
        _periods_check("period"),
    )

    id: Mapped[str] = mapped_column(primary_key=True, default=lambda: "lim_" + secrets.token_hex(12))
    scope: Mapped[str]
    scope_id: Mapped[str]
    limit_usd_micros: Mapped[int | None] = mapped_column(BigInteger)
    period: Mapped[str]
    soft_limit_usd_micros: Mapped[int | None] = mapped_column(BigInteger)
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    max_parallel: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"ScopeLimits({self.scope}={self.scope_id!r}, limit_usd_micros={self.limit_usd_micros}, {self.period})"


class SpendRecord(Base):
    """One finished request in the spend ledger, appended in batches by the background writer.

    ``cost_usd_micros`` is NULL when the model had no price: unknown cost is never recorded as a silent zero.
    The composite indexes serve "spend of this key/user/team since T" (the budget checks) and usage reports.
    """

    __tablename__ = "spend_records"
    __table_args__ = (
        Index(None, "key_id", "created_at"),
        Index(None, "user_id", "created_at"),
        Index(None, "team_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(_BIGINT_PK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    key_id: Mapped[str | None]
    user_id: Mapped[str | None]
    team_id: Mapped[str | None]
    route: Mapped[str]
    model: Mapped[str | None]  # NULL when the request was refused before a model was resolved
    deployment: Mapped[str | None]
    upstream_model: Mapped[str | None]
    prompt_name: Mapped[str | None]
    prompt_version: Mapped[int | None]
    experiment_arm: Mapped[str | None]
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    cached_tokens: Mapped[int] = mapped_column(default=0)
    cost_usd_micros: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[int]
    outcome: Mapped[str]
    latency_ms: Mapped[float]


class ChatSession(Base):
    """A conversation Keel keeps for its owner, so clients send only the new message.

    ``owner`` is who may see it: ``user:<user_id>`` for virtual keys (so a rotated key keeps its user's sessions),
    ``master``, or ``anonymous`` in open mode; ``key_id`` records the key that created it. ``summary`` folds in
    every message up to ``summary_upto``. ``last_seq`` allocates message numbers atomically, and ``turn_token`` /
    ``turn_expires_at`` is the lease that makes turns on one session run one at a time across workers.
    """

    __tablename__ = "chat_sessions"
    __table_args__ = (Index(None, "owner", "created_at"),)

    id: Mapped[str] = mapped_column(primary_key=True, default=lambda: "ses_" + secrets.token_hex(12))
    app: Mapped[str]
    owner: Mapped[str]
    key_id: Mapped[str | None]
    user_id: Mapped[str | None]
    title: Mapped[str | None]
    summary: Mapped[str | None] = mapped_column(Text)
    summary_upto: Mapped[int] = mapped_column(default=0)
    last_seq: Mapped[int] = mapped_column(default=0)
    turn_token: Mapped[str | None]
    turn_expires_at: Mapped[datetime | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_message_at: Mapped[datetime | None] = mapped_column(index=True)

    def __repr__(self) -> str:
        return f"ChatSession(id={self.id!r}, app={self.app!r}, owner={self.owner!r}, last_seq={self.last_seq})"


class ChatMessage(Base):
    """One message of a session, numbered by ``seq`` from 1. ``status`` is ``failed`` on a user message whose answer
    never completed (sending the same text again retries it). ``metadata`` holds citations, model and usage."""

    __tablename__ = "chat_messages"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant')", name="role_valid"),
        CheckConstraint("status IN ('ok', 'failed')", name="status_valid"),
    )

    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str]
    content: Mapped[str] = mapped_column(Text)
    pinned: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(default="ok")
    tokens: Mapped[int | None]
    request_id: Mapped[str | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"ChatMessage(session_id={self.session_id!r}, seq={self.seq}, role={self.role!r})"
