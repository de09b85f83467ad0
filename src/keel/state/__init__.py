"""Shared counters for rate limits, concurrency limits and budgets (see :mod:`keel.state.base` for the contract).

Two implementations with identical behaviour: :class:`MemoryCounters` keeps them in process, right for a single
worker and the default; :class:`RedisCounters` keeps them in Redis, so every worker of every replica sees the same
counts. :func:`counters_from_url` picks one from the ``redis_url`` setting.
"""

from __future__ import annotations

from keel.config import ConfigError
from keel.state.base import (
    Admission,
    BudgetLimit,
    ConcurrencyLimit,
    Counters,
    CountersUnavailable,
    Denial,
    WindowLimit,
)
from keel.state.memory import MemoryCounters
from keel.state.redis import RedisCounters, mask_url

__all__ = [
    "Admission",
    "BudgetLimit",
    "ConcurrencyLimit",
    "Counters",
    "CountersUnavailable",
    "Denial",
    "MemoryCounters",
    "RedisCounters",
    "WindowLimit",
    "counters_from_url",
]


def counters_from_url(url: str | None) -> Counters:
    """``None`` (or empty, as ``${REDIS_URL:-}`` gives) keeps counters in process; a Redis URL shares them."""
    if not url or not url.strip():
        return MemoryCounters()
    if url.split("://", 1)[0].lower() not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"redis_url: {mask_url(url)!r} is not a Redis URL. Use redis://[:password@]host:6379/0, rediss://... "
            "(TLS) or unix:///path/to/redis.sock, or remove redis_url to keep counters in process (one worker)."
        )
    try:
        return RedisCounters(url)
    except ValueError as exc:
        raise ConfigError(
            f"redis_url: {mask_url(url)!r} is malformed ({exc}). The form is redis://[:password@]host:port/db."
        ) from exc
