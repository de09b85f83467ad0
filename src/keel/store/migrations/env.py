"""Alembic environment for Keel's schema, for async engines.

At runtime :meth:`keel.store.Database.migrate` hands over an open connection (already holding the migration
lock) in ``config.attributes["connection"]``; no ``alembic.ini`` is involved. For development with the
``alembic`` command (``script_location = keel.store:migrations``), pass the database as ``-x url=...``::

    alembic -x url=sqlite:///dev.db revision --autogenerate -m "what changed"
    alembic -x url=postgresql://localhost/keel upgrade head --sql    # review the SQL without running it
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

import keel.prompts.models  # noqa: F401  (puts the prompt tables on Base.metadata, for autogenerate)
from keel.store.db import normalize_url
from keel.store.models import Base

config = context.config


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds the table instead
        compare_server_default=True,
        **options,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def _cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database as: alembic -x url=sqlite:///path/to/keel.db ...")
    return url


async def _run_cli_online() -> None:
    engine = create_async_engine(normalize_url(_cli_url()), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


given = config.attributes.get("connection")
if given is not None:
    _run(given)
elif context.is_offline_mode():
    _configure(url=normalize_url(_cli_url()), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_cli_online())
