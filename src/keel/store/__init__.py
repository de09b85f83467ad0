"""Keel's durable store: virtual keys, limits and the spend ledger, in SQLite (embedded default) or PostgreSQL
(to scale out), through SQLAlchemy 2 async and Alembic migrations shipped in the package.

::

    db = Database.from_url(default_sqlite_url())        # or "postgresql://user:pass@host/keel"
    await db.migrate()                                  # at every start; safe from many workers at once
    key, secret = await KeyRepository(db).create("alice", budget_usd=20, budget_period="monthly")
    spend = BatchWriter(SpendRepository(db).insert_many)
    await spend.start()                                 # the hot path calls spend.put({...}); stop() flushes

Repositories are thin async classes that take the :class:`Database`; money is integer micro-dollars and every
datetime is timezone-aware UTC.
"""

from __future__ import annotations

import os
from pathlib import Path

from keel.store.db import Database
from keel.store.keys import KeyRepository, hash_secret
from keel.store.limits import ScopeLimitsRepository
from keel.store.models import ScopeLimits, SpendRecord, VirtualKey
from keel.store.spend import SpendRepository
from keel.store.writer import BatchWriter

__all__ = [
    "BatchWriter",
    "Database",
    "KeyRepository",
    "ScopeLimits",
    "ScopeLimitsRepository",
    "SpendRecord",
    "SpendRepository",
    "VirtualKey",
    "default_sqlite_url",
    "hash_secret",
]


def default_sqlite_url() -> str:
    """``sqlite+aiosqlite:///$KEEL_HOME/keel.db``, with ``KEEL_HOME`` defaulting to ``.keel`` in the current
    directory: the embedded database when no URL is configured."""
    home = Path(os.environ.get("KEEL_HOME") or ".keel").expanduser().absolute()
    return f"sqlite+aiosqlite:///{home / 'keel.db'}"
