"""Vector indexes behind one :class:`VectorIndex` protocol: the embedded :class:`LocalIndex` (default, files under
``$KEEL_HOME/vectors``) and :class:`PgVectorIndex` (PostgreSQL + pgvector) for scale-out. Build the configured one
with :func:`build_index`."""

from __future__ import annotations

from keel.config import VectorStoreConfig
from keel.vector.base import Hit, VectorIndex, VectorIndexError, check_collection, payload_value
from keel.vector.local import LocalCollection, LocalIndex, default_vector_dir
from keel.vector.pgvector import PgVectorIndex

__all__ = [
    "Hit",
    "LocalCollection",
    "LocalIndex",
    "PgVectorIndex",
    "VectorIndex",
    "VectorIndexError",
    "build_index",
    "check_collection",
    "default_vector_dir",
    "payload_value",
]


def build_index(config: VectorStoreConfig) -> VectorIndex:
    """The index ``config`` describes. Nothing is opened until first use."""
    if config.backend == "pgvector":
        assert config.url is not None  # the config validator requires it
        return PgVectorIndex(config.url.get_secret_value())
    return LocalIndex(config.path)
