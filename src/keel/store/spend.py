"""The spend ledger: one row per finished request, appended in batches, summed for budgets and usage reports.

Money is integer micro-dollars. A NULL cost means the model had no price: sums skip it, and reports count such
requests separately (``unpriced_requests``) so an unknown cost never passes for zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal

import orjson
from sqlalchemy import String, func, insert, select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from keel.store.db import Database
from keel.store.models import SpendRecord, utcnow

__all__ = ["SpendRepository"]

Scope = Literal["key", "user", "team", "global"]
GroupBy = Literal["key", "user", "team", "model", "day"]

_TABLE: Final = SpendRecord.__table__
_COLUMNS: Final = frozenset(c.key for c in _TABLE.columns if not c.primary_key)
_REQUIRED: Final = frozenset(c.key for c in _TABLE.columns if not c.nullable and c.default is None) - {"id"}
# Every row carries every column: an executemany needs one shape for all its parameter sets.
_DEFAULTS: Final = {c: None for c in _COLUMNS} | {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}


class utc_day(FunctionElement[str]):
    """The UTC calendar day of a timestamp as ``YYYY-MM-DD`` text, on SQLite and PostgreSQL alike.

    Rendered without bound parameters, so PostgreSQL accepts the same expression in SELECT and GROUP BY.
    """

    type = String()
    name = "utc_day"
    inherit_cache = True


@compiles(utc_day, "sqlite")
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # UTCDateTime stores UTC text ("YYYY-MM-DD HH:MM:SS.ffffff") on SQLite.
    return f"date({compiler.process(element.clauses, **kw)})"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"to_char(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


class SpendRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append records (column name → value; ``created_at`` defaults to now) in one transaction and one
        executemany. All or nothing, so a retried batch is never half-written. Raises ``ValueError`` naming the
        first invalid record (unknown column, missing required one, naive ``created_at``) before touching the
        database, which is what tells :class:`~keel.store.writer.BatchWriter` to set that record aside."""
        if not records:
            return
        now = utcnow()
        rows = [_row(i, record, now) for i, record in enumerate(records)]
        async with self._db.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql(_SQLITE_INSERT, (_sqlite_rows(rows, conn.dialect),))
            else:
                await conn.execute(insert(SpendRecord), rows)

    async def total(self, scope: Scope, scope_id: str | None, since: datetime) -> int:
        """Micro-dollars spent by a key, user or team (or everyone, ``"global"``) since ``since``; unpriced
        requests add nothing."""
        stmt = select(func.sum(SpendRecord.cost_usd_micros)).where(SpendRecord.created_at >= since)
        if scope != "global":
            if scope_id is None:
                raise ValueError(f"scope {scope!r} needs a scope_id")
            stmt = stmt.where(_SCOPE_COLUMNS[scope] == scope_id)
        async with self._db.engine.connect() as conn:
            return int(await conn.scalar(stmt) or 0)  # SUM over no rows is NULL

    async def report(
        self,
        group_by: GroupBy,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        user_id: str | None = None,
        team_id: str | None = None,
        key_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Usage per key, user, team, public model or UTC day (``YYYY-MM-DD``) in ``[since, until)``, ordered by
        group (NULL group last). Each row: group, requests, prompt_tokens, completion_tokens, cost_usd_micros
        (priced requests only) and unpriced_requests."""
        group = utc_day(SpendRecord.created_at) if group_by == "day" else _GROUP_COLUMNS[group_by]
        stmt = (
            select(
                group.label("group"),
                func.count().label("requests"),
                func.coalesce(func.sum(SpendRecord.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(SpendRecord.completion_tokens), 0).label("completion_tokens"),
                func.coalesce(func.sum(SpendRecord.cost_usd_micros), 0).label("cost_usd_micros"),
                (func.count() - func.count(SpendRecord.cost_usd_micros)).label("unpriced_requests"),
            )
            .group_by(group)
            .order_by(group.asc().nulls_last())
        )
        filters = {SpendRecord.user_id: user_id, SpendRecord.team_id: team_id, SpendRecord.key_id: key_id}
        stmt = stmt.where(*(column == value for column, value in filters.items() if value is not None))
        if since is not None:
            stmt = stmt.where(SpendRecord.created_at >= since)
        if until is not None:
            stmt = stmt.where(SpendRecord.created_at < until)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        # PostgreSQL's SUM over integers is NUMERIC (Decimal in Python): hand back plain ints on both databases.
        return [{"group": row["group"], **{k: int(row[k]) for k in _REPORT_COUNTS}} for row in rows]


_SCOPE_COLUMNS: Final[dict[str, InstrumentedAttribute[str | None]]] = {
    "key": SpendRecord.key_id,
    "user": SpendRecord.user_id,
    "team": SpendRecord.team_id,
}
_REPORT_COUNTS: Final = ("requests", "prompt_tokens", "completion_tokens", "cost_usd_micros", "unpriced_requests")
_GROUP_COLUMNS: Final[dict[str, InstrumentedAttribute[Any]]] = {**_SCOPE_COLUMNS, "model": SpendRecord.model}


# SQLite: the whole batch as one JSON parameter of one INSERT ... SELECT. An executemany would release and retake
# the GIL around every row's sqlite3_step, and under load each retake waits out the event loop's switch interval
# (5 ms): the ledger then wrote ~1,000 rows/s while Keel served 1,500 requests/s, and the backlog grew without end.
_INSERT_COLUMNS: Final = tuple(c for c in _TABLE.columns if not c.primary_key)
_SQLITE_INSERT: Final = (
    f"INSERT INTO {SpendRecord.__tablename__} ({', '.join(c.name for c in _INSERT_COLUMNS)}) SELECT "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(_INSERT_COLUMNS)))
    + " FROM json_each(?)"
)


def _sqlite_rows(rows: Sequence[Mapping[str, Any]], dialect: Dialect) -> str:
    """The rows as a JSON array of arrays, each value as the column's type stores it on SQLite."""
    procs = [(c.key, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in _INSERT_COLUMNS]
    out = [[row[key] if proc is None or row[key] is None else proc(row[key]) for key, proc in procs] for row in rows]
    return orjson.dumps(out).decode()


def _row(index: int, record: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    unknown = record.keys() - _COLUMNS
    if unknown:
        raise ValueError(f"spend record {index}: unknown column(s) {', '.join(sorted(unknown))}")
    row = _DEFAULTS | {k: v for k, v in record.items() if v is not None}  # None: the column's default
    missing = [c for c in sorted(_REQUIRED) if row[c] is None]
    if missing:
        raise ValueError(f"spend record {index}: missing required column(s) {', '.join(missing)}")
    if row["created_at"] is None:
        row["created_at"] = now
    elif not isinstance(row["created_at"], datetime) or row["created_at"].tzinfo is None:
        raise ValueError(f"spend record {index}: created_at must be a timezone-aware datetime")
    return row
