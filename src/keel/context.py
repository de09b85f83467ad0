"""``RequestContext``: the one object that travels through the pipeline. Stages read and write it; nothing
else is threaded through function arguments. ``finish()`` runs the work deferred by stages (spend settlement,
log line, metrics) once the response is complete, which for a stream is when its last byte has gone out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.config import AppConfig
    from keel.pipeline.auth import Principal
    from keel.state import Admission

__all__ = ["Attempt", "RequestContext", "on_behalf_of"]

log = logging.getLogger("keel.pipeline")

_background: set[asyncio.Task[None]] = set()

Deferred = Callable[["RequestContext"], Awaitable[None] | None]


@dataclass(slots=True)
class Attempt:
    """One call to one deployment."""

    deployment: str
    outcome: str  # "ok" | an error code such as "upstream_timeout"
    ms: float
    status: int | None = None


@dataclass(slots=True)
class RequestContext:
    request_id: str
    route: str
    body: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None  # when the work was over, if before the log line is written (side calls, finish)

    authorization: str | None = None
    principal: Principal | None = None
    admission: Admission | None = None

    app: AppConfig | None = None  # app routes: the app whose prompt, history and retrieval apply
    variables: dict[str, str] = field(default_factory=dict)  # the app prompt's template variables
    session_id: str | None = None  # session routes: the chat session this turn belongs to
    prompt_name: str | None = None
    prompt_version: int | None = None  # None with a prompt_name: served from the bundled fallback file
    experiment_arm: str | None = None

    public_model: str | None = None
    deployment: str | None = None
    upstream_model: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    fallback_from: str | None = None

    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    cost_micros: int | None = None  # None: unknown (no price for the model), never a silent zero
    ttft_ms: float | None = None
    upstream_ms: float = 0.0
    chunks: int = 0

    status: int = 200
    outcome: str = "ok"
    error: KeelError | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # Model calls made on this request's behalf (a guardrail rail asking a model): each is logged and written to
    # the ledger as its own row under this request's principal, and its cost settles with this request's budgets.
    side_calls: list[RequestContext] = field(default_factory=list)

    _deferred: list[Deferred] = field(default_factory=list)
    _finished: bool = False

    def defer(self, fn: Deferred) -> None:
        """Run ``fn(ctx)`` when the response is complete (in reverse order of registration)."""
        self._deferred.append(fn)

    def fail(self, error: KeelError, outcome: str = "error") -> None:
        self.error = error
        self.status = error.status
        self.outcome = outcome

    @property
    def elapsed_ms(self) -> float:
        return ((self.ended or time.perf_counter()) - self.started) * 1000

    def finish_soon(self) -> None:
        """``finish()`` in a task of its own, for paths being cancelled (client disconnects)."""
        task = asyncio.get_running_loop().create_task(self.finish())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def finish(self) -> None:
        """Run deferred work once; a failing hook is logged and never hides the others."""
        if self._finished:
            return
        self._finished = True
        while self._deferred:
            fn = self._deferred.pop()
            try:
                result = fn(self)
                if result is not None:
                    await result
            except Exception:
                log.exception("deferred hook %r failed for request %s", fn, self.request_id)


# The request a guardrail check is running for, so that model calls the check makes (NeMo rails) are billed to it.
on_behalf_of: ContextVar[RequestContext | None] = ContextVar("keel_on_behalf_of", default=None)
