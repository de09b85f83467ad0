"""Budget periods and the budget side of admission: reservations, soft-threshold downgrades, emergency mode.

Spend is enforced from shared counters (exact across workers) and recorded in the durable ledger. A counter that
does not exist yet (first request of a period, a restarted Redis, a restarted single worker) is seeded from the
ledger before use, so a restart never hands out a fresh budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["Period", "period_of"]


@dataclass(frozen=True, slots=True)
class Period:
    id: str  # part of the counter key, e.g. "d2026-11-23"
    start: datetime
    end: datetime | None  # None: never resets

    @property
    def ttl_s(self) -> int:
        """How long the counter must outlive its last change: past the period's end, with a day of grace."""
        if self.end is None:
            return 400 * 86400
        return int((self.end - datetime.now(UTC)).total_seconds()) + 86400


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def period_of(kind: str, now: datetime | None = None) -> Period:
    """The current period of a budget that resets ``kind`` (daily, weekly, monthly, none), in UTC."""
    now = now or datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "daily":
        return Period(f"d{day:%Y-%m-%d}", day, day + timedelta(days=1))
    if kind == "weekly":
        start = day - timedelta(days=day.weekday())
        return Period(f"w{start:%Y-%m-%d}", start, start + timedelta(days=7))
    if kind == "monthly":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        return Period(f"m{start:%Y-%m}", start, end)
    if kind == "none":
        return Period("all", _EPOCH, None)
    raise ValueError(f"unknown budget period {kind!r}; use daily, weekly, monthly or none")
