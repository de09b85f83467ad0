"""The database handle: one async engine, sessions, Alembic migrations and a health check.

SQLite (embedded default) and PostgreSQL (scale-out) sit behind the same :class:`Database`. SQLite is tuned for
many concurrent async callers in one or several processes: WAL (readers never block the writer),
``busy_timeout`` (a second writer waits instead of failing with "database is locked"), ``synchronous=NORMAL``
(durable at every WAL checkpoint, fast commits) and foreign keys on. Python's ``sqlite3`` opens a transaction
only at the first write, so a read-then-write transaction takes the write lock when it writes, and waits for it.

:meth:`Database.migrate` runs at every start, from every worker at once: it serializes on a PostgreSQL advisory
lock, or on SQLite's write lock, so exactly one worker applies a revision and the others find it applied.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool

__all__ = ["Database"]

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
# pg_advisory_xact_lock key for migrations: any constant unlikely to collide with another application's (b"keel").
MIGRATION_LOCK_ID: Final = 0x6B65656C
_IN_PROCESS = threading.Lock()

_DRIVERS: Final = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class Database:
    """An async SQLAlchemy engine plus the session factory every repository uses.

    Build it with :meth:`from_url`; call :meth:`migrate` at start and :meth:`dispose` at shutdown. Never log
    the URL itself, only :attr:`redacted_url`.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str | URL, **engine_options: Any) -> Database:
        """``sqlite+aiosqlite:///path.db`` or ``postgresql+asyncpg://user:pass@host/db``; the sync spellings
        (``sqlite:///``, ``postgresql://``, ``postgres://``) are rewritten to the async drivers. For SQLite the
        file's directory is created. ``engine_options`` go to :func:`create_async_engine` (pool sizes, echo)."""
        parsed = normalize_url(url)
        options: dict[str, Any]
        if parsed.get_backend_name() == "sqlite":
            if _is_memory(parsed):
                # One shared connection: every new connection to ":memory:" would be a new, empty database.
                options = {"poolclass": StaticPool}
            else:
                Path(parsed.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
                options = {"pool_size": 5, "max_overflow": 10}
            engine = create_async_engine(parsed, **(options | engine_options))
            event.listen(engine.sync_engine, "connect", _tune_sqlite)
        else:
            options = {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": True, "pool_recycle": 1800}
            engine = create_async_engine(parsed, **(options | engine_options))
        return cls(engine)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def redacted_url(self) -> str:
        """The URL with its password masked: the only form of it that may be logged or shown."""
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Database({self.redacted_url!r})"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session inside a transaction: committed when the block exits normally, rolled back on an error.
        Objects stay readable after the commit (``expire_on_commit=False``)."""
        async with self._sessions.begin() as session:
            yield session

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revisions (Alembic ``upgrade heads``: each feature's migrations may form
        their own branch off the base); a no-op when already there.

        Safe to call from several workers at once: the whole upgrade runs in one transaction that first takes a
        PostgreSQL transaction-level advisory lock (or SQLite's write lock, ``BEGIN IMMEDIATE``), so a second
        worker waits, then finds the schema current.
        """
        # Alembic keeps the running migration in module globals, so within one process (whatever the event loop
        # or database) migrations take turns. Polled rather than awaited: a threading lock works across loops.
        while not _IN_PROCESS.acquire(blocking=False):  # noqa: ASYNC110 - see above
            await asyncio.sleep(0.01)
        try:
            async with self.engine.connect() as conn:
                if self.dialect == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                elif self.dialect == "sqlite":
                    await conn.exec_driver_sql("BEGIN IMMEDIATE")
                await conn.run_sync(_upgrade_head)
                await conn.commit()
        finally:
            _IN_PROCESS.release()

    async def ping(self, timeout_s: float = 5.0) -> None:
        """Round-trip ``SELECT 1``; raises (``TimeoutError`` or the driver's error) when the database is not
        usable. For readiness checks."""
        async with asyncio.timeout(timeout_s), self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection. Call at shutdown."""
        await self.engine.dispose()


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and point it at the async driver (``sslmode`` becomes asyncpg's ``ssl``); refuse databases
    Keel does not support."""
    parsed = make_url(url)
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///path/to/keel.db "
            "or postgresql://user:password@host:5432/dbname"
        )
    if driver == "postgresql+asyncpg" and "sslmode" in parsed.query and "ssl" not in parsed.query:
        # libpq spelling, found in most hosted PostgreSQL URLs; asyncpg takes the same values as ``ssl``.
        parsed = parsed.update_query_dict({"ssl": parsed.query["sslmode"]}).difference_update_query(["sslmode"])
    return parsed.set(drivername=driver)


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in (
        f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",  # first: switching to WAL may itself wait for a lock
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _upgrade_head(connection: Connection) -> None:
    """Alembic's ``upgrade heads`` on an open connection (``env.py`` picks it up from ``attributes``)."""
    from alembic import command  # here, not at import: alembic is a second or so of every CLI command's start
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "keel.store:migrations")
    config.attributes["connection"] = connection
    command.upgrade(config, "heads")
