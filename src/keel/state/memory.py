"""In-process :class:`~keel.state.base.Counters` for a single worker: the embedded default.

Atomic without locks: no method awaits between reading and writing state, so on one event loop every admit and
settle runs to completion before the next begins. :class:`~keel.state.redis.RedisCounters` runs the same algorithm
in Lua; the two must stay in step (``tests/state/test_counters.py`` runs the same cases against both).

Bounded memory over millions of requests and keys: every key is one entry in a recency-ordered dict. Touching an
entry prunes what has expired inside it (old buckets, lapsed leases and reservations) and moves it to the back.
After an operation, two entries at the front are examined per entry it added: dead ones are dropped, live ones
rotated to the back. Examining faster than adding means idle keys cannot pile up (the dead stay at most about as
many as the live), at O(1) amortised per call. ``max_keys`` caps the total by evicting from the front (least
recently used); evicting a live entry forgets its counts, so it is a safety valve, not a mode of operation.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Literal

from keel.state.base import Admission, BudgetLimit, ConcurrencyLimit, Denial, WindowLimit

__all__ = ["SETTLE_WITHIN_S", "MemoryCounters", "settle_deadline_s"]

SETTLE_WITHIN_S = 3600.0
"""An admission stays settleable this long at least (longer if one of its TTLs is). Settling marks it done, which
makes a second settle a no-op; the mark expires so admissions that are never settled do not pile up."""


def settle_deadline_s(
    windows: Sequence[WindowLimit], leases: Sequence[ConcurrencyLimit], budgets: Sequence[BudgetLimit]
) -> float:
    """How long an allowed admission can still be settled (shared with RedisCounters so both agree)."""
    return max(
        SETTLE_WITHIN_S,
        *(w.window_s for w in windows),
        *(c.ttl_s for c in leases),
        *(b.reservation_ttl_s for b in budgets),
    )


class _Window:
    """One-second buckets, oldest first, with their running total."""

    __slots__ = ("buckets", "total", "window_s")

    def __init__(self, window_s: int) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, units]
        self.total = 0
        self.window_s = window_s

    def prune(self, now_s: int, window_s: int) -> None:
        self.window_s = window_s
        cutoff = now_s - window_s
        while self.buckets and self.buckets[0][0] <= cutoff:
            self.total -= self.buckets.popleft()[1]

    def add(self, now_s: int, amount: int) -> None:
        if self.buckets and self.buckets[-1][0] == now_s:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([now_s, amount])
        self.total += amount

    def correct(self, bucket: int, delta: int) -> None:
        for entry in reversed(self.buckets):  # the bucket is recent: search from the newest
            if entry[0] == bucket:
                new = max(0, entry[1] + delta)
                self.total += new - entry[1]
                entry[1] = new
                return

    def retry_after(self, need: int, now: float) -> float:
        """Seconds until the oldest buckets that free ``need`` units have left the window."""
        freed = 0
        for second, units in self.buckets:
            freed += units
            if freed >= need:
                return second + self.window_s - now
        return float(self.window_s)

    def dead(self, now: float) -> bool:
        self.prune(math.floor(now), self.window_s)
        return not self.buckets


class _Leases:
    """Lease id -> expiry. Only scanned when the earliest expiry has passed."""

    __slots__ = ("held", "next_expiry")

    def __init__(self) -> None:
        self.held: dict[str, float] = {}
        self.next_expiry = math.inf

    def prune(self, now: float) -> None:
        if now >= self.next_expiry:
            self.held = {lease: exp for lease, exp in self.held.items() if exp > now}
            self.next_expiry = min(self.held.values(), default=math.inf)

    def take(self, lease_id: str, expiry: float) -> None:
        self.held[lease_id] = expiry
        self.next_expiry = min(self.next_expiry, expiry)

    def dead(self, now: float) -> bool:
        self.prune(now)
        return not self.held


class _Budget:
    """``spent`` (``None`` until seeded or charged), the reservations in flight, and their running total."""

    __slots__ = ("expires_at", "reservations", "reserved", "spent")

    def __init__(self) -> None:
        self.spent: int | None = None
        self.reserved = 0
        self.reservations = _Reservations()
        self.expires_at = math.inf

    def prune(self, now: float) -> None:
        self.reserved -= self.reservations.prune(now)

    def dead(self, now: float) -> bool:
        return now >= self.expires_at


class _Reservations:
    __slots__ = ("items", "next_expiry")

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, float]] = {}  # lease id -> (micros, expiry)
        self.next_expiry = math.inf

    def prune(self, now: float) -> int:
        """Drop the lapsed reservations; return the micros they held."""
        if now < self.next_expiry:
            return 0
        lapsed = sum(micros for micros, exp in self.items.values() if exp <= now)
        self.items = {lease: item for lease, item in self.items.items() if item[1] > now}
        self.next_expiry = min((exp for _, exp in self.items.values()), default=math.inf)
        return lapsed

    def put(self, lease_id: str, micros: int, expiry: float) -> int:
        """Reserve; return the micros a previous reservation under the same id held."""
        previous = self.items.get(lease_id, (0, 0.0))[0]
        self.items[lease_id] = (micros, expiry)
        self.next_expiry = min(self.next_expiry, expiry)
        return previous

    def pop(self, lease_id: str) -> int:
        return self.items.pop(lease_id, (0, 0.0))[0]


class _Expiring:
    """A KV value, or the mark that an admission awaits its settle (``value`` None)."""

    __slots__ = ("expires_at", "value")

    def __init__(self, value: bytes | None, expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at

    def dead(self, now: float) -> bool:
        return now >= self.expires_at


_Entry = _Window | _Leases | _Budget | _Expiring
_Kind = Literal["w", "c", "b", "kv", "a"]


class MemoryCounters:
    """Counters held in this process. ``clock`` is monotonic seconds (injectable for tests)."""

    def __init__(self, *, max_keys: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self.generation = 0  # this process's counters live and die with it
        self._clock = clock
        self._entries: OrderedDict[tuple[_Kind, str], _Entry] = OrderedDict()
        self._added = 0

    def __len__(self) -> int:
        """Entries held: windows, lease sets, budgets, KV values and unsettled admissions."""
        return len(self._entries)

    def _get(self, kind: _Kind, key: str, now: float) -> _Entry | None:
        entry = self._entries.get((kind, key))
        if entry is None:
            return None
        if isinstance(entry, _Budget | _Expiring) and entry.dead(now):
            del self._entries[(kind, key)]
            return None
        self._entries.move_to_end((kind, key))
        return entry

    def _put(self, kind: _Kind, key: str, entry: _Entry) -> None:
        self._entries[(kind, key)] = entry
        self._entries.move_to_end((kind, key))
        self._added += 1

    def _sweep(self, now: float) -> None:
        """At the end of an operation (never midway, so no entry in use is dropped): examine two entries at the
        front per entry the operation added, dropping the dead and rotating the live; then enforce max_keys."""
        for _ in range(min(2 * self._added, len(self._entries))):
            front_key, front = next(iter(self._entries.items()))
            if front.dead(now):
                del self._entries[front_key]
            else:
                self._entries.move_to_end(front_key)
        self._added = 0
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def _window(self, key: str, window_s: int, now: float) -> _Window | None:
        entry = self._get("w", key, now)
        if isinstance(entry, _Window):
            entry.prune(math.floor(now), window_s)
            return entry
        return None

    def _leases(self, key: str, now: float) -> _Leases | None:
        entry = self._get("c", key, now)
        if isinstance(entry, _Leases):
            entry.prune(now)
            return entry
        return None

    def _budget(self, key: str, now: float) -> _Budget | None:
        entry = self._get("b", key, now)
        if isinstance(entry, _Budget):
            entry.prune(now)
            return entry
        return None

    async def admit(
        self,
        lease_id: str,
        windows: Sequence[WindowLimit] = (),
        leases: Sequence[ConcurrencyLimit] = (),
        budgets: Sequence[BudgetLimit] = (),
    ) -> Admission:
        admission = Admission(False, lease_id, windows=windows, leases=leases, budgets=budgets)
        if not (windows or leases or budgets):
            admission.allowed = True
            return admission
        now = self._clock()
        now_s = math.floor(now)
        denial: Denial | None = None

        window_state = [self._window(w.key, w.window_s, now) for w in windows]
        used = [state.total if state else 0 for state in window_state]
        for i, (w, state, u) in enumerate(zip(windows, window_state, used, strict=True)):
            if denial is None and u + w.amount > w.limit:
                fits = state is not None and w.amount <= w.limit  # an amount over the limit never fits
                retry = state.retry_after(u + w.amount - w.limit, now) if state is not None and fits else None
                denial = Denial("window", i, w.key, w.limit, u, retry)

        lease_state: list[_Leases | None] = []
        for i, c in enumerate(leases if denial is None else ()):
            held = self._leases(c.key, now)
            lease_state.append(held)
            count = len(held.held) if held else 0
            if count >= c.limit:
                retry = min(1.0, min(held.held.values()) - now) if held and held.held else None
                denial = Denial("concurrency", i, c.key, c.limit, count, retry)
                break

        budget_state: list[_Budget | None] = []
        for i, b in enumerate(budgets if denial is None else ()):
            budget = self._budget(b.key, now)
            budget_state.append(budget)
            current = (budget.spent or 0) + budget.reserved if budget else 0
            if b.limit_micros is not None and current + b.amount_micros > b.limit_micros:
                denial = Denial("budget", i, b.key, b.limit_micros, current, None)
                break

        if denial is not None:
            admission.denial = denial
            admission.remaining = [max(0, w.limit - u) for w, u in zip(windows, used, strict=True)]
            return admission

        for w, window, u in zip(windows, window_state, used, strict=True):
            if window is None:
                window = _Window(w.window_s)
                self._put("w", w.key, window)
            window.add(now_s, w.amount)
            admission.remaining.append(max(0, w.limit - u - w.amount))
            admission.buckets.append(now_s)
        for c, held in zip(leases, lease_state, strict=True):
            if held is None:
                held = _Leases()
                self._put("c", c.key, held)
            held.take(lease_id, now + c.ttl_s)
        for b, budget in zip(budgets, budget_state, strict=True):
            if budget is None:
                budget = _Budget()
                self._put("b", b.key, budget)
            budget.reserved += b.amount_micros - budget.reservations.put(
                lease_id, b.amount_micros, now + b.reservation_ttl_s
            )
            budget.expires_at = now + b.ttl_s
        self._put("a", lease_id, _Expiring(None, now + settle_deadline_s(windows, leases, budgets)))
        self._sweep(now)
        admission.allowed = True
        return admission

    async def settle(
        self, admission: Admission, window_actuals: Sequence[int] | None = None, cost_micros: int = 0
    ) -> None:
        if not admission.allowed:
            return
        now = self._clock()
        if self._get("a", admission.lease_id, now) is None:
            return  # settled already (or never admitted here, or past settle_deadline_s)
        del self._entries[("a", admission.lease_id)]
        actuals = [w.amount for w in admission.windows] if window_actuals is None else window_actuals
        for w, bucket, actual in zip(admission.windows, admission.buckets, actuals, strict=True):
            window = self._window(w.key, w.window_s, now)  # pruned: a bucket that left the window is gone
            if window is not None and actual != w.amount:
                window.correct(bucket, actual - w.amount)
        for c in admission.leases:
            held = self._leases(c.key, now)
            if held is not None:
                held.held.pop(admission.lease_id, None)
        for b in admission.budgets:
            budget = self._budget(b.key, now)
            if budget is None:
                if not cost_micros:
                    continue
                budget = _Budget()
                self._put("b", b.key, budget)
            budget.reserved -= budget.reservations.pop(admission.lease_id)
            if cost_micros:
                budget.spent = (budget.spent or 0) + cost_micros
            budget.expires_at = now + b.ttl_s
        self._sweep(now)

    async def budget_spent(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        now = self._clock()
        out = []
        for key in keys:
            budget = self._budget(key, now)
            out.append((budget.spent or 0, budget.reserved) if budget else (0, 0))
        return out

    async def budget_seed(self, key: str, spent_micros: int, ttl_s: int) -> bool:
        now = self._clock()
        budget = self._budget(key, now)
        if budget is not None and budget.spent is not None and budget.spent >= spent_micros:
            return False
        if budget is None:
            budget = _Budget()
            self._put("b", key, budget)
        budget.spent = spent_micros
        budget.expires_at = now + ttl_s
        self._sweep(now)
        return True

    async def get(self, key: str) -> bytes | None:
        entry = self._get("kv", key, self._clock())
        return entry.value if isinstance(entry, _Expiring) else None

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        now = self._clock()
        self._put("kv", key, _Expiring(value, math.inf if ttl_s is None else now + ttl_s))
        self._sweep(now)

    async def delete(self, key: str) -> None:
        self._entries.pop(("kv", key), None)

    async def ping(self) -> None:
        """Always reachable."""

    async def aclose(self) -> None:
        self._entries.clear()
