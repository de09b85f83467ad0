"""A PostgreSQL with pgvector for the session, and ``index``: each contract test on the embedded index and on
pgvector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fixtures.postgres_server import PostgresServer
from keel.vector import LocalIndex, PgVectorIndex, VectorIndex
from vector.pgserver import start_pgvector_server


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[PostgresServer]:
    server = start_pgvector_server()
    yield server
    server.stop()


@pytest.fixture(params=["local", "pgvector"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorIndex]:
    if request.param == "local":
        built: VectorIndex = LocalIndex(tmp_path / "vectors")
    else:
        server: PostgresServer = request.getfixturevalue("pgvector_server")
        database = server.new_database()
        built = PgVectorIndex(database)
    yield built
    await built.aclose()
