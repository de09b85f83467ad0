"""The model router: public model names → deployments, with the resilience wrapped around providers.

For each request the router walks a chain of public names (the requested one, then its ``fallbacks``; after a
context-length error, its ``context_window_fallbacks`` instead). Within one name it makes up to
``max_retries + 1`` attempts, each on a deployment picked by weight among those not cooling down, preferring one
that has not failed this request. Between attempts it sleeps exponential backoff with full jitter, or the
upstream's ``Retry-After`` when that is longer; a ``Retry-After`` beyond ``max_retry_after_s`` skips straight to
the next fallback instead of making the client wait.

Each deployment has a circuit breaker: ``cooldown.failures`` retryable failures within ``cooldown.window_s``
(or a 429 with ``Retry-After``) open it for ``cooldown_s``; afterwards one trial request is let through and its
outcome closes or re-opens the breaker. A dead upstream therefore stops costing latency after a few requests.

Streams follow the contract in DESIGN.md: retries and fallbacks happen only before the first chunk, which is
awaited under ``first_token_timeout_s``; :meth:`Router.stream` returns once a first chunk is in hand, so the
HTTP layer can still answer a clean error status when everything failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from keel.config import KeelConfig, ModelConfig
from keel.context import Attempt, RequestContext
from keel.errors import (
    ContextWindowExceeded,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    UpstreamError,
)
from keel.llm.base import Provider, Timeouts

__all__ = ["Breaker", "DeploymentHandle", "PrimedStream", "Router"]

T = TypeVar("T")


_TIMER_SLACK_S = 0.005


@dataclass(slots=True)
class Breaker:
    """Per-deployment circuit breaker (closed → open → half-open trial → closed/open)."""

    failures: int
    window_s: float
    cooldown_s: float
    recent: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    trial_in_flight: bool = False

    def available(self, now: float) -> bool:
        if now >= self.open_until:
            return not (self.open_until and self.trial_in_flight)
        return False

    def begin(self, now: float) -> None:
        if self.open_until and now >= self.open_until:
            self.trial_in_flight = True

    def success(self) -> None:
        self.recent.clear()
        self.open_until = 0.0
        self.trial_in_flight = False

    def failure(self, now: float, retry_after: float | None = None) -> None:
        if self.trial_in_flight:
            self.trial_in_flight = False
            self.open_until = now + self.cooldown_s
            return
        if retry_after:
            # The upstream told us when to come back: believe it.
            self.open_until = max(self.open_until, now + retry_after)
        self.recent.append(now)
        while self.recent and self.recent[0] < now - self.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.failures:
            self.open_until = max(self.open_until, now + self.cooldown_s)
            self.recent.clear()

    def cooling(self, now: float) -> bool:
        return now < self.open_until


@dataclass(slots=True)
class DeploymentHandle:
    id: str
    upstream_model: str
    weight: float
    provider: Provider
    breaker: Breaker


@dataclass(slots=True)
class _Route:
    config: ModelConfig
    deployments: list[DeploymentHandle]
    timeouts: Timeouts


@dataclass(slots=True)
class PrimedStream:
    """A stream whose first chunk has arrived; iterate it for the rest (first chunk included)."""

    first: dict[str, Any]
    rest: AsyncIterator[dict[str, Any]]
    deadline: float | None
    close: Callable[[], Awaitable[None]]

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            yield self.first
            while True:
                if self.deadline is None:
                    chunk = await anext(self.rest)
                else:
                    async with asyncio.timeout_at(self.deadline):
                        chunk = await anext(self.rest)
                yield chunk
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise ProviderTimeout("the upstream stream exceeded its total timeout") from exc
        finally:
            await self.close()


ProviderFactory = Callable[[Any], Provider]


class Router:
    """Routes OpenAI-shaped requests to deployments; see the module docstring for the policy."""

    def __init__(self, config: KeelConfig, build_provider: ProviderFactory, *, rng: random.Random | None = None):
        self._rng = rng or random.Random()
        self._routes: dict[str, _Route] = {}
        for m in config.models:
            handles = [
                DeploymentHandle(
                    id=d.id,
                    upstream_model=d.model,
                    weight=d.weight,
                    provider=build_provider(d),
                    breaker=Breaker(m.cooldown.failures, m.cooldown.window_s, m.cooldown.cooldown_s),
                )
                for d in m.resolved_deployments()
            ]
            timeouts = Timeouts(connect=m.connect_timeout_s, total=m.timeout_s, first_token=m.first_token_timeout_s)
            self._routes[m.name] = _Route(m, handles, timeouts)

    @property
    def names(self) -> list[str]:
        return list(self._routes)

    def deployments(self) -> list[DeploymentHandle]:
        return [d for r in self._routes.values() for d in r.deployments]

    def route(self, name: str) -> _Route:
        route = self._routes.get(name)
        if route is None:
            raise ModelNotFound(
                f"The model {name!r} does not exist. Available models: {', '.join(self._routes)}", param="model"
            )
        return route

    async def aclose(self) -> None:
        for d in self.deployments():
            await d.provider.aclose()

    # -- public operations -------------------------------------------------------------------------------------

    async def complete(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        async def op(d: DeploymentHandle, t: Timeouts) -> dict[str, Any]:
            return await _with_total(d.provider.complete(_for(body, d), t), t.total)

        return await self._run(ctx, op)

    async def embed(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        async def op(d: DeploymentHandle, t: Timeouts) -> dict[str, Any]:
            return await _with_total(d.provider.embed(_for(body, d), t), t.total)

        return await self._run(ctx, op)

    async def stream(self, ctx: RequestContext, body: dict[str, Any]) -> PrimedStream:
        stream_options = dict(body.get("stream_options") or {})
        stream_options["include_usage"] = True  # always: cost and budgets need it
        streamed = {**body, "stream": True, "stream_options": stream_options}

        async def op(d: DeploymentHandle, t: Timeouts) -> PrimedStream:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + t.total if t.total else None
            gen = d.provider.stream(_for(streamed, d), t)
            first_deadline = loop.time() + t.first_token if t.first_token else None
            if deadline is not None and (first_deadline is None or deadline < first_deadline):
                first_deadline = deadline
            try:
                if first_deadline is None:
                    first = await anext(gen)
                else:
                    async with asyncio.timeout_at(first_deadline):
                        first = await anext(gen)
            except StopAsyncIteration:
                raise UpstreamError(f"upstream {d.id} sent an empty stream", deployment=d.id) from None
            except TimeoutError:
                await _aclose(gen)
                raise ProviderTimeout(f"upstream {d.id} sent no first token in time", deployment=d.id) from None
            except BaseException:
                await _aclose(gen)
                raise

            async def close() -> None:
                await _aclose(gen)

            return PrimedStream(first, gen, deadline, close)

        return await self._run(ctx, op)

    # -- the policy --------------------------------------------------------------------------------------------

    async def _run(self, ctx: RequestContext, op: Callable[[DeploymentHandle, Timeouts], Awaitable[T]]) -> T:
        requested = ctx.public_model or ""
        chain = [requested, *self.route(requested).config.fallbacks]
        tried: set[str] = set()
        last: ProviderError | None = None
        i = 0
        while i < len(chain):
            name = chain[i]
            i += 1
            if name in tried:
                continue
            tried.add(name)
            route = self.route(name)
            if name != requested:
                ctx.fallback_from = requested
            try:
                return await self._attempts(ctx, route, op)
            except ContextWindowExceeded as exc:
                last = exc
                bigger = [n for n in route.config.context_window_fallbacks if n not in tried]
                if not bigger:
                    raise
                chain = bigger + chain[i:]
                i = 0
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _attempts(
        self, ctx: RequestContext, route: _Route, op: Callable[[DeploymentHandle, Timeouts], Awaitable[T]]
    ) -> T:
        cfg = route.config
        failed: set[str] = set()
        last: ProviderError | None = None
        for attempt in range(cfg.max_retries + 1):
            d = self._pick(route, failed)
            if d is None:
                break
            now = time.monotonic()
            d.breaker.begin(now)
            t0 = time.perf_counter()
            ctx.deployment, ctx.upstream_model = d.id, d.upstream_model
            try:
                result = await op(d, route.timeouts)
            except ProviderError as exc:
                ms = (time.perf_counter() - t0) * 1000
                exc.deployment = exc.deployment or d.id
                ctx.attempts.append(Attempt(d.id, exc.code or exc.type, ms, exc.status))
                ctx.upstream_ms += ms
                if not exc.retryable:
                    if isinstance(exc, ContextWindowExceeded):
                        d.breaker.success()  # the deployment is healthy; the request was too long
                    raise
                d.breaker.failure(time.monotonic(), exc.retry_after if isinstance(exc, RateLimited) else None)
                failed.add(d.id)
                last = exc
                if attempt == cfg.max_retries:
                    break
                wait = self._rng.uniform(0, min(cfg.retry_max_backoff_s, cfg.retry_backoff_s * 2**attempt))
                if exc.retry_after is not None:
                    if exc.retry_after > cfg.max_retry_after_s:
                        break  # the upstream wants longer than we will hold the client: fall back now
                    # Past the deployment's reopening: event loops may fire a timer up to a millisecond early
                    # (uvloop counts in whole milliseconds), which would find it still cooling down.
                    wait = max(wait, exc.retry_after + _TIMER_SLACK_S)
                await asyncio.sleep(wait)
                continue
            except asyncio.CancelledError:
                ms = (time.perf_counter() - t0) * 1000
                ctx.attempts.append(Attempt(d.id, "cancelled", ms))
                ctx.upstream_ms += ms
                d.breaker.trial_in_flight = False
                raise
            ms = (time.perf_counter() - t0) * 1000
            ctx.attempts.append(Attempt(d.id, "ok", ms, 200))
            ctx.upstream_ms += ms
            d.breaker.success()
            return result
        if last is None:
            names = ", ".join(d.id for d in route.deployments)
            last = UpstreamError(
                f"every deployment of {cfg.name!r} is cooling down after repeated failures ({names})",
                code="all_deployments_cooling_down",
            )
        raise last

    def _pick(self, route: _Route, failed: set[str]) -> DeploymentHandle | None:
        now = time.monotonic()
        ready = [d for d in route.deployments if d.breaker.available(now)]
        if not ready:
            return None
        fresh = [d for d in ready if d.id not in failed] or ready
        if len(fresh) == 1:
            return fresh[0]
        return self._rng.choices(fresh, weights=[d.weight for d in fresh])[0]


def _for(body: dict[str, Any], d: DeploymentHandle) -> dict[str, Any]:
    return {**body, "model": d.upstream_model}


async def _with_total(aw: Awaitable[T], total: float | None) -> T:
    if total is None:
        return await aw
    try:
        async with asyncio.timeout(total):
            return await aw
    except TimeoutError:
        raise ProviderTimeout(f"the upstream did not answer within {total:g}s") from None


async def _aclose(gen: AsyncIterator[Any]) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
