"""Accounting: the per-request log line and metrics, deferred until the response is complete."""

from __future__ import annotations

from keel.context import RequestContext
from keel.observe.logs import request_logger
from keel.observe.metrics import observe_request

__all__ = ["record_request"]


def record_request(ctx: RequestContext) -> None:
    """One structured log line and the metrics for a finished request. Never raises into the request."""
    total_ms = ctx.elapsed_ms
    observe_request(ctx, total_ms)
    if request_logger.disabled:
        return
    usage = ctx.usage or {}
    fields = {
        "request_id": ctx.request_id,
        "route": ctx.route,
        "model": ctx.public_model,
        "deployment": ctx.deployment,
        "upstream_model": ctx.upstream_model,
        "stream": ctx.stream,
        "attempts": [{"deployment": a.deployment, "outcome": a.outcome, "ms": round(a.ms, 2)} for a in ctx.attempts],
        "fallback_from": ctx.fallback_from,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "usage_estimated": ctx.usage_estimated,
        "latency_ms": round(total_ms, 2),
        "upstream_ms": round(ctx.upstream_ms, 2),
        "ttft_ms": round(ctx.ttft_ms, 2) if ctx.ttft_ms is not None else None,
        "status": ctx.status,
        "outcome": ctx.outcome,
        "error": ctx.error.message if ctx.error else None,
    }
    if ctx.timings:
        fields["stages_ms"] = {k: round(v, 3) for k, v in ctx.timings.items()}
    request_logger.info("request", extra={"fields": fields})
