"""The :class:`VectorIndex` protocol: named collections of (id, unit vector, JSON payload) points, scored by dot
product (= cosine for the normalised vectors Keel's embedders return).

Payload conventions every index relies on: ``document`` (str) names the source a point came from, so a changed
file's chunks can be replaced with :meth:`VectorIndex.delete_document`; ``doc_hash`` (str) is that source's
fingerprint, listed by :meth:`VectorIndex.documents` so ingestion can skip what has not changed. Filters are
equality on payload values, with dotted keys for nested objects (``{"fields.brand": "Sony"}``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from keel.errors import KeelError

__all__ = ["Hit", "VectorIndex", "VectorIndexError", "check_collection", "payload_value"]

Vectors = npt.NDArray[np.float32]
_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class VectorIndexError(KeelError):
    """The vector index cannot be used (server down, files unreadable, mismatched dimensions)."""

    status = 503
    type = "server_error"
    code = "vector_index_unavailable"


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


@runtime_checkable
class VectorIndex(Protocol):
    async def upsert(
        self, collection: str, ids: Sequence[str], vectors: Vectors, payloads: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert or replace points; creates the collection, whose vector size is fixed by its first upsert."""
        ...

    async def delete_document(self, collection: str, document: str) -> int:
        """Delete every point whose payload ``document`` is ``document``; returns how many."""
        ...

    async def documents(self, collection: str) -> dict[str, str | None]:
        """Each ``document`` in the collection with its ``doc_hash`` payload value."""
        ...

    async def search(
        self,
        collection: str,
        vector: Vectors,
        top_k: int = 5,
        min_score: float = -1.0,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The ``top_k`` best points scoring at least ``min_score`` whose payload matches ``filter``, best first.
        A collection that does not exist has no points."""
        ...

    async def count(self, collection: str) -> int: ...

    async def drop(self, collection: str) -> None:
        """Delete the collection and everything in it (no error when absent)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`VectorIndexError` when the index cannot be used; for readiness checks."""
        ...

    async def aclose(self) -> None: ...


def check_collection(name: str) -> str:
    """``name`` if it is a valid collection name: it becomes a directory or table name, so it is restricted."""
    if not _COLLECTION.match(name):
        raise ValueError(
            f"invalid collection name {name!r}: use 1-63 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def payload_value(payload: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` (``fields.brand``), or None when absent."""
    value: Any = payload
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value
