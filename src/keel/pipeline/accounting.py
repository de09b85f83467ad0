"""Accounting: what a request cost, the spend ledger, the per-request log line and metrics.

Cost is computed as soon as usage is known (so it can go in the ``x-keel-cost-usd`` header or the final stream
chunk); the ledger record, log line and metrics are deferred until the response is complete. The ledger goes
through a :class:`~keel.store.writer.BatchWriter`, so recording spend never waits on the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from keel.context import RequestContext
from keel.llm.pricing import PriceBook, cost_micros
from keel.observe.logs import log_request, request_logger
from keel.observe.metrics import observe_request
from keel.store.writer import BatchWriter

__all__ = ["Accounting", "cost_header", "record_request"]


def cost_header(ctx: RequestContext) -> str:
    return "unknown" if ctx.cost_micros is None else f"{ctx.cost_micros / 1_000_000:.6f}"


class Accounting:
    """``charge``: adds a call's cost to its principal's budgets, for calls no admitted request settles (the
    admission stage's :meth:`~keel.pipeline.admission.AdmissionStage.charge`; none: budgets are not kept)."""

    def __init__(
        self,
        prices: PriceBook,
        ledger: BatchWriter[dict[str, Any]],
        charge: Callable[[RequestContext], Awaitable[None]] | None = None,
    ) -> None:
        self.prices = prices
        self.ledger = ledger
        self.charge = charge

    def price(self, ctx: RequestContext) -> None:
        """Set ``ctx.cost_micros`` from the usage and the price of the deployment that served."""
        ctx.cost_micros = cost_micros(self.prices.for_deployment(ctx.deployment), ctx.usage)

    def record(self, ctx: RequestContext) -> None:
        """Queue the ledger row (deferred hook). Requests refused before reaching a model spent nothing and are
        left to the request log. Model calls made on the request's behalf get their own rows and log lines."""
        for call in ctx.side_calls:
            self.price(call)
            self.record(call)
            record_request(call)
        if ctx.deployment is None:
            return
        principal = ctx.principal
        usage = ctx.usage or {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        self.ledger.put(
            {
                "request_id": ctx.request_id,
                "created_at": datetime.now(UTC),
                "key_id": principal.key_id if principal else None,
                "user_id": principal.user_id if principal else None,
                "team_id": principal.team_id if principal else None,
                "route": ctx.route,
                "model": ctx.public_model,
                "deployment": ctx.deployment,
                "upstream_model": ctx.upstream_model,
                "prompt_name": ctx.prompt_name,
                "prompt_version": ctx.prompt_version,
                "experiment_arm": ctx.experiment_arm,
                "prompt_tokens": _int(usage.get("prompt_tokens")),
                "completion_tokens": _int(usage.get("completion_tokens")),
                "cached_tokens": _int(cached),
                "cost_usd_micros": ctx.cost_micros,
                "status": ctx.status,
                "outcome": ctx.outcome,
                "latency_ms": round(ctx.elapsed_ms, 3),
            }
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def record_request(ctx: RequestContext) -> None:
    """One structured log line and the metrics for a finished request. Never raises into the request."""
    total_ms = ctx.elapsed_ms
    observe_request(ctx, total_ms)
    if request_logger.disabled:
        return
    usage = ctx.usage or {}
    principal = ctx.principal
    fields = {
        "request_id": ctx.request_id,
        "route": ctx.route,
        "key_id": principal.key_id if principal else None,
        "user_id": principal.user_id if principal else None,
        "model": ctx.public_model,
        "deployment": ctx.deployment,
        "upstream_model": ctx.upstream_model,
        "stream": ctx.stream,
        "attempts": [{"deployment": a.deployment, "outcome": a.outcome, "ms": round(a.ms, 2)} for a in ctx.attempts],
        "fallback_from": ctx.fallback_from,
        "prompt_name": ctx.prompt_name,
        "prompt_version": ctx.prompt_version,
        "experiment_arm": ctx.experiment_arm,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "usage_estimated": ctx.usage_estimated,
        "cost_usd": None if ctx.cost_micros is None else ctx.cost_micros / 1_000_000,
        "latency_ms": round(total_ms, 2),
        "upstream_ms": round(ctx.upstream_ms, 2),
        "ttft_ms": round(ctx.ttft_ms, 2) if ctx.ttft_ms is not None else None,
        "status": ctx.status,
        "outcome": ctx.outcome,
        "error": ctx.error.message if ctx.error else None,
    }
    if ctx.timings:
        fields["stages_ms"] = {k: round(v, 3) for k, v in ctx.timings.items()}
    log_request(fields)
