"""Shared counters: the state that rate limits, concurrency limits and budget reservations need to hold *across
workers*. The embedded default keeps it in process (one worker); the scale-out implementation keeps it in Redis,
where every check below is one atomic Lua script, so N workers admit exactly what one would.

One call, :meth:`Counters.admit`, checks every limit that applies to a request and takes them all or none: a
request refused by its user's limit leaves no trace on its key's. :meth:`Counters.settle` then replaces the
reserved amounts with the actual ones (tokens, cost) and releases the concurrency slots.

Semantics every implementation must follow exactly (the tests run the same cases against both):

- :class:`WindowLimit`: at most ``limit`` units in any sliding window of ``window_s`` seconds, counted in
  one-second buckets. ``amount`` is what this request adds (1 for requests per minute; an estimate for tokens
  per minute, corrected at settle). A request whose ``amount`` alone exceeds ``limit`` is refused.
  ``retry_after_s`` on refusal: seconds until enough of the window has expired for it to fit.
- :class:`ConcurrencyLimit`: at most ``limit`` leases held at once under ``key``. A lease expires after
  ``ttl_s`` even if never released (a crashed worker cannot leak slots forever).
- :class:`BudgetLimit`: refused when ``spent + reserved + amount_micros > limit_micros``; otherwise
  ``amount_micros`` is reserved under the admission's ``lease_id``. Reservations expire after
  ``reservation_ttl_s`` (crashed workers again). At settle the reservation is dropped and the actual cost added to
  ``spent``. The budget's counters expire ``ttl_s`` after their last change (set it past the period's end); the
  period is part of ``key``. ``limit_micros`` of ``None`` means "track spend, never refuse" (soft thresholds
  and the global cap read ``spent`` back through :meth:`Counters.budget_spent`).
- Money is integer micro-dollars (1 USD = 1_000_000) everywhere in this module.

Errors: an unreachable backend raises :class:`CountersUnavailable`; the caller applies the configured
failure policy (fail closed by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from keel.errors import KeelError

__all__ = [
    "Admission",
    "BudgetLimit",
    "ConcurrencyLimit",
    "Counters",
    "CountersUnavailable",
    "Denial",
    "WindowLimit",
]


class CountersUnavailable(KeelError):
    """The shared state backend (Redis) cannot be reached."""

    status = 503
    type = "service_unavailable"
    code = "limits_backend_unavailable"


@dataclass(frozen=True, slots=True)
class WindowLimit:
    key: str
    limit: int
    amount: int
    window_s: int = 60


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    key: str
    limit: int
    ttl_s: float = 900.0


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    key: str
    limit_micros: int | None
    amount_micros: int
    ttl_s: int
    reservation_ttl_s: float = 900.0


@dataclass(frozen=True, slots=True)
class Denial:
    """Which limit refused, and what the caller needs for a useful error and ``Retry-After``."""

    kind: Literal["window", "concurrency", "budget"]
    index: int  # position in the list of that kind passed to admit()
    key: str
    limit: int | None
    current: int  # units used in the window / leases held / micros spent + reserved
    retry_after_s: float | None  # None for budgets (they reset with the period, which the caller knows)


@dataclass(slots=True)
class Admission:
    """The result of :meth:`Counters.admit`. When ``allowed``, hand it back to :meth:`Counters.settle`."""

    allowed: bool
    lease_id: str
    denial: Denial | None = None
    # After this request, per WindowLimit in order: units left in the window (for x-ratelimit-remaining-*).
    remaining: list[int] = field(default_factory=list)
    # The one-second bucket each window charged, so settle can correct the same bucket.
    buckets: list[int] = field(default_factory=list)
    windows: Sequence[WindowLimit] = ()
    leases: Sequence[ConcurrencyLimit] = ()
    budgets: Sequence[BudgetLimit] = ()


class Counters(Protocol):
    # Changes whenever the counters may have been lost since (a new connection to a Redis that may have restarted
    # empty): budgets seeded from the ledger before then must be seeded again.
    generation: int

    async def admit(
        self,
        lease_id: str,
        windows: Sequence[WindowLimit] = (),
        leases: Sequence[ConcurrencyLimit] = (),
        budgets: Sequence[BudgetLimit] = (),
    ) -> Admission:
        """Check and take every limit atomically; all or nothing."""
        ...

    async def settle(
        self, admission: Admission, window_actuals: Sequence[int] | None = None, cost_micros: int = 0
    ) -> None:
        """Finish an allowed admission: windows get their actual amounts (``None`` keeps the reserved ones),
        leases are released, budget reservations become ``cost_micros`` of spend. Idempotent per lease_id."""
        ...

    async def budget_spent(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        """(spent, reserved) micros per budget key; (0, 0) for unknown keys."""
        ...

    async def budget_seed(self, key: str, spent_micros: int, ttl_s: int) -> bool:
        """Raise a budget's spent counter to at least ``spent_micros`` (the durable ledger's total, which lags the
        counters and so never lowers them; it restores what a lost counter forgot). True if it changed."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raise ``CountersUnavailable`` when the backend cannot be reached."""
        ...

    async def aclose(self) -> None: ...
