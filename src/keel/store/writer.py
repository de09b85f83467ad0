"""A background batch writer: the hot path hands records over without waiting; a task writes them in batches.

Durability: records live in memory until their batch is written, so a crash (or a kill without a graceful
:meth:`BatchWriter.stop`) loses at most the records not yet flushed, about one ``interval_s`` worth, plus any held
back while the sink was failing. A failing sink (database down) loses nothing: the batch stays queued and is
retried with backoff. Only when ``max_pending`` records are waiting are new ones refused, counted in
:attr:`BatchWriter.dropped` and logged as errors (once per interval, not once per record); so are records the
sink rejects as invalid (``ValueError``), which would otherwise block every record behind them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["BatchWriter"]

log = logging.getLogger("keel.store")

T = TypeVar("T")


class BatchWriter(Generic[T]):
    """Queue items with :meth:`put` (never blocks); a background task calls ``await sink(batch)`` every
    ``interval_s``, or as soon as ``max_batch`` items are pending, with batches of at most ``max_batch``.
    A crash loses at most one interval of items: those not yet flushed.

    The sink must be all-or-nothing (one transaction, as :meth:`SpendRepository.insert_many` is), or a retried
    batch would be partly written twice. Its exceptions mean two things: ``ValueError`` says the data is bad and
    will never be written (the writer then retries the batch item by item and drops, counts and logs only the
    items refused again); anything else is taken as passing (the database is down) and the batch is retried
    with backoff. Use from one event loop; ``put`` is not thread-safe.
    """

    def __init__(
        self,
        sink: Callable[[Sequence[T]], Awaitable[object]],
        *,
        interval_s: float = 1.0,
        max_batch: int = 500,
        max_pending: int = 100_000,
        max_backoff_s: float = 30.0,
        name: str = "batch writer",
    ) -> None:
        if interval_s <= 0 or max_batch < 1 or max_pending < max_batch:
            raise ValueError("need interval_s > 0, max_batch >= 1 and max_pending >= max_batch")
        self._sink = sink
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.max_backoff_s = max_backoff_s
        self.name = name
        self._items: collections.deque[T] = collections.deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failures = 0
        self._dropped = 0
        self._dropped_unlogged = 0
        self._drop_logged_at = float("-inf")
        self._written = 0

    @property
    def pending(self) -> int:
        """Items queued and not yet written."""
        return len(self._items)

    @property
    def written(self) -> int:
        """Items the sink has accepted."""
        return self._written

    @property
    def dropped(self) -> int:
        """Items lost: refused because ``max_pending`` was reached, rejected by the sink as invalid, or still
        unwritten when :meth:`stop` gave up."""
        return self._dropped

    def put(self, item: T) -> None:
        """Queue one item. Never blocks, never raises for a full queue: it drops the item and counts it."""
        if len(self._items) >= self.max_pending:
            self._drop(1, "queue full")
            return
        self._items.append(item)
        if len(self._items) >= self.max_batch and not self._failures:
            self._wake.set()

    async def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"keel {self.name}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the background task and write everything still queued (graceful shutdown), retrying failures
        for up to ``timeout_s``; whatever still could not be written then is counted as dropped and logged."""
        deadline = time.monotonic() + timeout_s
        if self._task is not None:
            self._closing = True
            self._wake.set()
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        attempt = 0
        error: Exception | None = None
        while self._items:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop(
                    len(self._items), f"stopped before they could be written; last error: {error!r}", force_log=True
                )
                self._items.clear()
                return
            try:
                await asyncio.wait_for(self.flush(), remaining)
            except Exception as exc:
                error = exc
                attempt += 1
                await asyncio.sleep(min(self._backoff(attempt), max(0.0, deadline - time.monotonic())))

    async def flush(self) -> None:
        """Write everything queued now, batch by batch. Raises the sink's error; unwritten items stay queued."""
        async with self._flushing:
            while self._items:
                batch = list(itertools.islice(self._items, self.max_batch))
                try:
                    await self._sink(batch)
                except ValueError:
                    await self._isolate(len(batch))
                    continue
                # put() only appends, so the batch is still the head of the queue.
                for _ in batch:
                    self._items.popleft()
                self._written += len(batch)

    async def _isolate(self, count: int) -> None:
        """The sink refused the data itself: write the first ``count`` items one by one so that only the bad
        ones are dropped, instead of one bad item blocking everything behind it forever."""
        for _ in range(count):
            try:
                await self._sink([self._items[0]])
            except ValueError as exc:
                self._drop(1, f"rejected by the sink: {exc}")
            else:
                self._written += 1
            self._items.popleft()

    async def _run(self) -> None:
        while True:
            delay = self._backoff(self._failures) if self._failures else self.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except Exception:
                self._failures += 1
                log.warning(
                    "%s: sink failed (attempt %d), %d items kept for retry",
                    self.name,
                    self._failures,
                    len(self._items),
                    exc_info=True,
                )
            else:
                if self._failures:
                    log.info("%s: sink recovered after %d failed attempts", self.name, self._failures)
                self._failures = 0

    def _backoff(self, attempt: int) -> float:
        """Exponential from ``interval_s``, capped, with jitter so several workers do not retry in step."""
        ceiling = min(self.interval_s * 2 ** min(attempt, 30), self.max_backoff_s)
        return random.uniform(ceiling / 2, ceiling)

    def _drop(self, count: int, reason: str, *, force_log: bool = False) -> None:
        self._dropped += count
        self._dropped_unlogged += count
        now = time.monotonic()
        if force_log or now - self._drop_logged_at >= self.interval_s:
            log.error(
                "%s: DROPPED %d items (%s); %d dropped in total, %d pending",
                self.name,
                self._dropped_unlogged,
                reason,
                self._dropped,
                len(self._items),
            )
            self._dropped_unlogged = 0
            self._drop_logged_at = now
