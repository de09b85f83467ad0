"""Limits for users and teams: a budget per period, and requests/tokens per minute and concurrency. (A key's own
limits live on the key row.)

Enforcement happens elsewhere, against shared counters on the hot path; this is the durable definition.
"""

from __future__ import annotations

import builtins

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from keel.errors import InvalidRequest
from keel.store.db import Database
from keel.store.models import LIMIT_SCOPES, ScopeLimits, check_period, check_soft_limit, usd_to_micros, utcnow

__all__ = ["ScopeLimitsRepository"]


class ScopeLimitsRepository:
    """At most one row per ``(scope, scope_id)``; invalid values raise :class:`~keel.errors.InvalidRequest`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def upsert(
        self,
        scope: str,
        scope_id: str,
        *,
        limit_usd: float | None = None,
        period: str = "none",
        soft_limit_usd: float | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
    ) -> ScopeLimits:
        """Create the scope's limits or replace them all, in one atomic statement (no lost update when two
        admins race)."""
        _check_scope(scope, scope_id)
        for name, value in (("rpm", rpm), ("tpm", tpm), ("max_parallel", max_parallel)):
            if value is not None and value < 1:
                raise InvalidRequest(f"{name} must be at least 1", param=name)
        limit = usd_to_micros(limit_usd, "limit_usd")
        soft = usd_to_micros(soft_limit_usd, "soft_limit_usd")
        if soft is not None and limit is None:
            raise InvalidRequest("soft_limit_usd needs limit_usd", param="soft_limit_usd")
        check_soft_limit(limit, soft, "soft_limit_usd")
        now = utcnow()
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        stmt = insert(ScopeLimits).values(
            scope=scope,
            scope_id=scope_id,
            limit_usd_micros=limit,
            period=check_period(period, "period"),
            soft_limit_usd_micros=soft,
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            created_at=now,
            updated_at=now,
        )
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[ScopeLimits.scope, ScopeLimits.scope_id],
            set_={
                ScopeLimits.limit_usd_micros: excluded.limit_usd_micros,
                ScopeLimits.period: excluded.period,
                ScopeLimits.soft_limit_usd_micros: excluded.soft_limit_usd_micros,
                ScopeLimits.rpm: excluded.rpm,
                ScopeLimits.tpm: excluded.tpm,
                ScopeLimits.max_parallel: excluded.max_parallel,
                ScopeLimits.updated_at: excluded.updated_at,
            },
        )
        async with self._db.session() as session:
            result = await session.scalars(stmt.returning(ScopeLimits), execution_options={"populate_existing": True})
            return result.one()

    async def get(self, scope: str, scope_id: str) -> ScopeLimits | None:
        async with self._db.session() as session:
            return await session.scalar(
                select(ScopeLimits).where(ScopeLimits.scope == scope, ScopeLimits.scope_id == scope_id)
            )

    async def list(self, scope: str | None = None) -> builtins.list[ScopeLimits]:
        stmt = select(ScopeLimits).order_by(ScopeLimits.scope, ScopeLimits.scope_id)
        if scope is not None:
            stmt = stmt.where(ScopeLimits.scope == scope)
        async with self._db.session() as session:
            return builtins.list(await session.scalars(stmt))

    async def delete(self, scope: str, scope_id: str) -> bool:
        """Remove the scope's limits; ``False`` if it had none."""
        async with self._db.session() as session:
            result = await session.execute(
                delete(ScopeLimits)
                .where(ScopeLimits.scope == scope, ScopeLimits.scope_id == scope_id)
                .returning(ScopeLimits.id)
            )
            return result.first() is not None


def _check_scope(scope: str, scope_id: str) -> None:
    if scope not in LIMIT_SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(LIMIT_SCOPES)}, got {scope!r}", param="scope")
    if not scope_id:
        raise InvalidRequest("scope_id is required", param="scope_id")
