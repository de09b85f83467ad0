"""Prometheus metrics. With several workers, ``keel serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a shared
directory before the workers start, and ``/metrics`` aggregates every worker's values."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from keel import errors
from keel.context import RequestContext

__all__ = [
    "CONTENT_TYPE_LATEST",
    "observe_gc_pauses",
    "observe_guard_check",
    "observe_guardrails",
    "observe_request",
    "register_models",
    "render",
]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter("keel_requests_total", "Requests answered", ["route", "model", "status"])
DURATION = Histogram("keel_request_duration_seconds", "Time to the last byte", ["route", "model"], buckets=_LATENCY)
OVERHEAD = Histogram(
    "keel_overhead_seconds",
    "Time Keel adds to a request (total minus upstream attempts)",
    ["route"],
    buckets=_OVERHEAD,
)
TTFT = Histogram("keel_time_to_first_token_seconds", "Streams: time to the first chunk", ["model"], buckets=_LATENCY)
ATTEMPTS = Counter("keel_upstream_attempts_total", "Calls to upstream deployments", ["deployment", "outcome"])
# Attempt outcomes are Keel's error codes; an upstream's own codes (its 4xx bodies say anything) are one label.
_OUTCOMES = frozenset(
    {"ok", "cancelled", "upstream_redirect"}
    | {
        value
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.KeelError)
        for value in (cls.code, cls.type)
        if isinstance(value, str)
    }
)
TOKENS = Counter("keel_tokens_total", "Tokens reported by upstreams", ["model", "kind"])
_GUARD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
GUARD_CHECK = Histogram(
    "keel_guardrail_check_seconds", "Time one guardrail check took", ["check", "direction"], buckets=_GUARD
)
GUARD_OUTCOMES = Counter(
    "keel_guardrail_checks_total",
    "Guardrail check results (pass, block, redact, warn, error, timeout)",
    ["check", "direction", "outcome"],
)
GUARDRAILS = Histogram(
    "keel_guardrails_seconds", "Wall time of all of one text's guardrail checks together", ["direction"], buckets=_GUARD
)


_models: set[str] = set()
_request_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}


def register_models(names: list[str]) -> None:
    """The public model names that may appear as a ``model`` label. Anything else a client sends is counted as
    ``unknown``: a label per made-up name would grow the registry (and every scrape) without bound."""
    _models.update(names)


def observe_request(ctx: RequestContext, total_ms: float) -> None:
    if _gc_pauses:
        _drain_gc_pauses()
    model = "-" if ctx.public_model is None else ctx.public_model if ctx.public_model in _models else "unknown"
    # Labelled children are cached: labels() costs more than the observations themselves.
    key = (ctx.route, model, ctx.status)
    children = _request_children.get(key)
    if children is None:
        children = (
            REQUESTS.labels(ctx.route, model, str(ctx.status)),
            DURATION.labels(ctx.route, model),
            OVERHEAD.labels(ctx.route),
        )
        _request_children[key] = children
    children[0].inc()
    children[1].observe(total_ms / 1000)
    children[2].observe(max(0.0, total_ms - ctx.upstream_ms) / 1000)
    if ctx.ttft_ms is not None:
        TTFT.labels(model).observe(ctx.ttft_ms / 1000)
    for a in ctx.attempts:
        _child(ATTEMPTS, a.deployment, a.outcome if a.outcome in _OUTCOMES else "upstream_rejected").inc()
    if ctx.usage:
        for kind in ("prompt", "completion"):
            n = ctx.usage.get(kind + "_tokens")
            if isinstance(n, int) and n > 0:
                _child(TOKENS, model, kind).inc(n)


# Bounded: deployments come from the config, outcomes from _OUTCOMES, models from the config (else "unknown").
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: labels() costs more than the observation itself."""
    child = _children.get((metric, labels))
    if child is None:
        child = _children[(metric, labels)] = metric.labels(*labels)
    return child


_guard_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def observe_guard_check(check: str, direction: str, outcome: str, seconds: float) -> None:
    # Labelled children are cached: several checks per message, and labels() costs more than the observation.
    key = (check, direction, outcome)
    children = _guard_children.get(key)
    if children is None:
        children = (GUARD_CHECK.labels(check, direction), GUARD_OUTCOMES.labels(check, direction, outcome))
        _guard_children[key] = children
    children[0].observe(seconds)
    children[1].inc()


def observe_guardrails(direction: str, seconds: float) -> None:
    GUARDRAILS.labels(direction).observe(seconds)


GC_PAUSE = Histogram(
    "keel_gc_pause_seconds",
    "Time the garbage collector stopped the process, per collection",
    ["generation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
_gc_started = 0.0
_gc_pauses: list[tuple[int, float]] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    # Runs inside whatever allocation triggered the collection, perhaps while prometheus_client holds one of its
    # locks: only note the pause here; observe_request moves it into the histogram.
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif len(_gc_pauses) < 10_000:
        _gc_pauses.append((info["generation"], time.perf_counter() - _gc_started))


def observe_gc_pauses() -> None:
    """Time every garbage collection (idempotent): a pause stalls every request in flight on this worker."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def _drain_gc_pauses() -> None:
    global _gc_pauses
    pauses, _gc_pauses = _gc_pauses, []
    for generation, seconds in pauses:
        GC_PAUSE.labels(str(generation)).observe(seconds)


def render() -> bytes:
    _drain_gc_pauses()  # this worker's, even if it has served no model request since
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
