"""The :class:`Embedder` protocol and what every embedder shares: concurrent callers' texts coalesced into one
batch, and an LRU cache of recent texts (retrieval, the semantic cache and the topic guardrail embed the same user
message within one request, and the previous turn again on the next)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from keel.errors import KeelError

__all__ = ["BatchingEmbedder", "Embedder", "EmbeddingError", "Vectors", "normalize"]

Vectors = npt.NDArray[np.float32]


class EmbeddingError(KeelError):
    """The embedder cannot produce vectors (model files missing or altered, upstream down or malformed)."""

    status = 503
    type = "server_error"
    code = "embedding_unavailable"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, one row per text, so a dot product is a cosine."""

    @property
    def name(self) -> str:
        """Identifies the vector space: vectors from embedders with different names must never be compared."""
        ...

    @property
    def dim(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> Vectors: ...

    async def aclose(self) -> None: ...


def normalize(vectors: Vectors) -> Vectors:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: Vectors = np.zeros(vectors.shape, dtype=np.float32)
    np.divide(vectors, norms, out=out, where=norms > 0)
    return out


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Vectors] = OrderedDict()

    def get(self, key: str) -> Vectors | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Vectors) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_Request = tuple[list[str], "asyncio.Future[Vectors]"]


class BatchingEmbedder(ABC):
    """Coalescing and caching around a batch call, :meth:`_embed_batch`, that subclasses implement.

    When no batch is running, a caller's uncached texts go at the next turn of the event loop (with whatever
    other callers added in the same turn): an idle embedder adds no wait. While a batch runs, new texts wait at most
    ``window_s`` for more, or less once ``batch_size`` texts are pending, and go as one call. Identical texts are
    embedded once.
    """

    def __init__(self, *, batch_size: int = 32, cache_size: int = 4096, window_s: float = 0.002) -> None:
        self.batch_size = batch_size
        self.window_s = window_s
        self.cache = _LRU(cache_size)
        self.batches = 0  # calls of _embed_batch, for tests and metrics
        self._pending: list[_Request] = []
        self._pending_texts = 0
        self._timer: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    async def _embed_batch(self, texts: list[str]) -> Vectors:
        """Vectors for distinct, uncached ``texts``, normalised, in order."""

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows: list[Vectors | None] = [self.cache.get(t) for t in texts]
        missing = list(dict.fromkeys(t for t, row in zip(texts, rows, strict=True) if row is None))
        if missing:
            future: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
            self._pending.append((missing, future))
            self._pending_texts += len(missing)
            if self._pending_texts >= self.batch_size:
                self._flush()
            elif self._timer is None:
                loop = asyncio.get_running_loop()
                idle = not self._tasks
                self._timer = loop.call_soon(self._flush) if idle else loop.call_later(self.window_s, self._flush)
            found = dict(zip(missing, await future, strict=True))
            rows = [found[t] if row is None else row for t, row in zip(texts, rows, strict=True)]
        return np.stack(rows)  # type: ignore[arg-type]

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        requests, self._pending, self._pending_texts = self._pending, [], 0
        if requests:
            task = asyncio.get_running_loop().create_task(self._run(requests))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, requests: list[_Request]) -> None:
        texts = list(dict.fromkeys(t for batch, _ in requests for t in batch))
        try:
            self.batches += 1
            vectors = await self._embed_batch(texts)
            if vectors.shape[0] != len(texts):
                raise EmbeddingError(f"{self.name} returned {vectors.shape[0]} vectors for {len(texts)} texts")
        except BaseException as exc:
            for _, future in requests:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        by_text = {t: vectors[i].copy() for i, t in enumerate(texts)}
        for text, row in by_text.items():
            self.cache.put(text, row)
        for batch, future in requests:
            if not future.done():
                future.set_result(np.stack([by_text[t] for t in batch]))
