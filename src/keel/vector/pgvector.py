"""``PgVectorIndex``: the scale-out :class:`~keel.vector.base.VectorIndex` on PostgreSQL with pgvector, for several
hosts sharing one index.

Each collection is a table ``keel_vec_<hash>`` (id, document, embedding vector(dim), payload jsonb) with an HNSW
index on inner product, a btree on ``document`` and a GIN index on ``payload`` for equality filters (``@>``). The
registry ``keel_vector_collections`` maps names to tables and fixes each collection's dimension. Vectors travel in
pgvector's binary format. Filtered queries use pgvector's iterative index scans (0.8+), so a selective filter
still returns ``top_k`` rows. The database needs the extension available (``CREATE EXTENSION vector`` is run if
the role may; on Debian/Ubuntu install ``postgresql-NN-pgvector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import numpy as np
import orjson

from keel.vector.base import Hit, VectorIndexError, Vectors, check_collection

__all__ = ["PgVectorIndex"]

_REGISTRY = "keel_vector_collections"
_LOCK_ID = 0x6B76_6563  # pg_advisory_xact_lock key serialising collection creation (b"kvec")
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _dsn(url: str) -> str:
    """asyncpg's spelling of a SQLAlchemy-style URL."""
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def _encode(vector: Any) -> bytes:
    values = np.asarray(vector, dtype=">f4").reshape(-1)
    return struct.pack(">HH", values.shape[0], 0) + values.tobytes()


def _decode(data: bytes) -> Vectors:
    (dim,) = struct.unpack_from(">H", data)
    return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


def _containment(filter: Mapping[str, Any]) -> str:
    """``{"fields.brand": "Sony"}`` as the jsonb document ``{"fields": {"brand": "Sony"}}`` for ``@>``."""
    doc: dict[str, Any] = {}
    for key, value in filter.items():
        if isinstance(value, dict | list):
            raise ValueError("filter values must be strings, numbers, booleans or null")
        *parents, last = key.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return orjson.dumps(doc).decode()


class PgVectorIndex:
    """pgvector behind the :class:`~keel.vector.base.VectorIndex` protocol. ``ef_search`` trades HNSW recall for
    speed (pgvector's default is 40)."""

    def __init__(self, url: str, *, pool_size: int = 10, ef_search: int = 100, timeout_s: float = 10.0) -> None:
        self._dsn = _dsn(url)
        self._pool_size = pool_size
        self._ef_search = ef_search
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._tables: dict[str, tuple[str, int]] = {}
        self._lock = asyncio.Lock()

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                try:
                    self._pool = await self._open()
                except _FAILURES as exc:
                    raise VectorIndexError(f"pgvector: cannot connect or set up ({exc!r})") from exc
            return self._pool

    async def _open(self) -> asyncpg.Pool:
        conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s)
        try:
            if await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'vector'") == 0:
                try:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except asyncpg.PostgresError as exc:
                    raise VectorIndexError(
                        f"pgvector: the extension is not installed in this database and cannot be created ({exc}); "
                        "run `CREATE EXTENSION vector` as a superuser (package postgresql-NN-pgvector)"
                    ) from exc
            schema = await conn.fetchval(
                "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                "WHERE t.typname = 'vector'"
            )
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_REGISTRY} "
                "(name text PRIMARY KEY, table_name text NOT NULL UNIQUE, dim int NOT NULL)"
            )
        finally:
            await conn.close()
        ef_search = self._ef_search

        async def setup(connection: asyncpg.Connection) -> None:
            await connection.set_type_codec("vector", schema=schema, encoder=_encode, decoder=_decode, format="binary")
            await connection.execute(f"SET hnsw.ef_search = {int(ef_search)}")
            # pgvector < 0.8 has no iterative scans: there a filtered query may return fewer than top_k rows.
            with contextlib.suppress(asyncpg.PostgresError):
                await connection.execute("SET hnsw.iterative_scan = relaxed_order")

        pool: asyncpg.Pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            init=setup,
            command_timeout=self._timeout_s,
            timeout=self._timeout_s,
        )
        return pool

    async def _table(self, collection: str, dim: int | None = None) -> tuple[str, int] | None:
        """The collection's table and dimension; created with ``dim`` when given and absent."""
        check_collection(collection)
        found = self._tables.get(collection)
        if found is not None:
            return found
        pool = await self._connect()
        async with pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT table_name, dim FROM {_REGISTRY} WHERE name = $1", collection)
            if row is None and dim is not None:
                table = "keel_vec_" + hashlib.sha256(collection.encode()).hexdigest()[:16]
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, document text NOT NULL, "
                        f"embedding vector({dim}) NOT NULL, payload jsonb NOT NULL)"
                    )
                    await conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw (embedding vector_ip_ops)"
                    )
                    await conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_document ON {table} (document)")
                    await conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {table}_payload ON {table} USING gin (payload jsonb_path_ops)"
                    )
                    await conn.execute(
                        f"INSERT INTO {_REGISTRY} (name, table_name, dim) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        collection,
                        table,
                        dim,
                    )
                row = await conn.fetchrow(f"SELECT table_name, dim FROM {_REGISTRY} WHERE name = $1", collection)
        if row is None:
            return None
        self._tables[collection] = (row["table_name"], row["dim"])
        return self._tables[collection]

    async def _run(self, work: Any) -> Any:
        try:
            return await work
        except asyncpg.UndefinedTableError:
            self._tables.clear()  # dropped by another process
            raise VectorIndexError("pgvector: the collection was dropped meanwhile; retry") from None
        except _FAILURES as exc:
            raise VectorIndexError(f"pgvector: {exc!r}") from exc

    async def upsert(
        self, collection: str, ids: Sequence[str], vectors: Vectors, payloads: Sequence[Mapping[str, Any]]
    ) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids) or len(payloads) != len(ids):
            raise ValueError(f"upsert needs one vector and one payload per id (got {vectors.shape}, {len(payloads)})")
        if not ids:
            return
        found = await self._run(self._table(collection, vectors.shape[1]))
        table, dim = found
        if dim != vectors.shape[1]:
            raise VectorIndexError(
                f"collection {collection!r} holds {dim}-dimensional vectors, got {vectors.shape[1]}: the embedder "
                "changed; drop the collection and ingest again (`keel ingest --rebuild`)"
            )
        rows = [
            (point_id, str(payload.get("document", "")), vector, orjson.dumps(dict(payload)).decode())
            for point_id, vector, payload in zip(ids, vectors, payloads, strict=True)
        ]
        pool = await self._connect()

        async def write() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    f"INSERT INTO {table} (id, document, embedding, payload) VALUES ($1, $2, $3, $4::jsonb) "
                    "ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, embedding = EXCLUDED.embedding, "
                    "payload = EXCLUDED.payload",
                    rows,
                )

        await self._run(write())

    async def delete_document(self, collection: str, document: str) -> int:
        found = await self._run(self._table(collection))
        if found is None:
            return 0
        pool = await self._connect()
        status = await self._run(pool.execute(f"DELETE FROM {found[0]} WHERE document = $1", document))
        return int(str(status).rsplit(" ", 1)[-1])

    async def documents(self, collection: str) -> dict[str, str | None]:
        found = await self._run(self._table(collection))
        if found is None:
            return {}
        pool = await self._connect()
        rows = await self._run(
            pool.fetch(f"SELECT DISTINCT ON (document) document, payload->>'doc_hash' AS hash FROM {found[0]}")
        )
        return {r["document"]: r["hash"] for r in rows}

    async def search(
        self,
        collection: str,
        vector: Vectors,
        top_k: int = 5,
        min_score: float = -1.0,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        found = await self._run(self._table(collection))
        if found is None or top_k < 1:
            return []
        table, dim = found
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != dim:
            raise VectorIndexError(
                f"collection {collection!r} holds {dim}-dimensional vectors; the query has {query.shape[0]}"
            )
        where, args = "", [query, top_k]
        if filter:
            where, args = "WHERE payload @> $3::jsonb", [*args, _containment(filter)]
        pool = await self._connect()
        rows = await self._run(
            pool.fetch(
                f"SELECT id, payload::text AS payload, -(embedding <#> $1) AS score FROM {table} {where} "
                "ORDER BY embedding <#> $1 LIMIT $2",
                *args,
            )
        )
        return [Hit(r["id"], float(r["score"]), orjson.loads(r["payload"])) for r in rows if r["score"] >= min_score]

    async def count(self, collection: str) -> int:
        found = await self._run(self._table(collection))
        if found is None:
            return 0
        pool = await self._connect()
        total: int = await self._run(pool.fetchval(f"SELECT count(*) FROM {found[0]}"))
        return total

    async def drop(self, collection: str) -> None:
        found = await self._run(self._table(collection))
        self._tables.pop(collection, None)
        if found is None:
            return
        pool = await self._connect()

        async def work() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"DROP TABLE IF EXISTS {found[0]}")
                await conn.execute(f"DELETE FROM {_REGISTRY} WHERE name = $1", collection)

        await self._run(work())

    async def ping(self) -> None:
        pool = await self._connect()
        await self._run(pool.fetchval("SELECT 1"))

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
