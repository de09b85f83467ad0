"""Admission: rate limits, concurrency limits and budgets, taken in one atomic step before the model is called.

Everything that applies to a request (its key's and its user's requests and tokens per minute and concurrency,
the key's, user's and team's budgets, the global daily cap) goes to :meth:`Counters.admit` together, so a request
refused by one limit consumes none of the others. Tokens and cost are reserved from estimates (the prompt's
estimated tokens plus ``max_tokens``, or ``budgets.output_tokens_estimate``) and settled to the real figures when
the response is complete. Concurrent requests therefore cannot overshoot a budget by more than the difference
between estimates and actuals of the requests already admitted.

Above a budget's soft threshold, requests are downgraded to ``budgets.downgrade_model`` (header
``x-keel-downgraded``). Past ``budgets.global_daily_usd`` Keel enters emergency mode for the rest of the UTC day:
every request goes to ``budgets.emergency_model`` and long prompts are refused, until an administrator lifts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from keel.config import KeelConfig
from keel.context import RequestContext
from keel.errors import BudgetExceeded, InvalidRequest, RateLimitExceeded
from keel.llm.pricing import PriceBook, cost_micros, estimate_cost_micros
from keel.llm.tokens import estimate_usage
from keel.pipeline.auth import Principal, ScopeSettings
from keel.pipeline.budget import Period, period_of
from keel.state import Admission, BudgetLimit, ConcurrencyLimit, Counters, CountersUnavailable, Denial, WindowLimit
from keel.store.spend import SpendRepository

__all__ = ["AdmissionStage", "EmergencyMode"]

log = logging.getLogger("keel.admission")

_RESEED_S = 300.0  # re-check budget counters against the ledger this often (a Redis restart loses them)


def usd(micros: int | None) -> str:
    return "unknown" if micros is None else f"${micros / 1_000_000:.4f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class _Budget:
    scope: str
    scope_id: str | None
    period: Period
    limit: BudgetLimit


class EmergencyMode:
    """The global daily cap's switch, kept in the shared counters so every worker sees it."""

    KEY = "emergency"

    def __init__(self, counters: Counters, cap_micros: int | None) -> None:
        self.counters = counters
        self.cap_micros = cap_micros
        self._cached: tuple[float, dict[str, Any] | None] = (0.0, None)

    def _lifted_key(self, day: Period) -> str:
        return f"emergency:lifted:{day.id}"

    async def status(self, *, fresh: bool = False) -> dict[str, Any] | None:
        now = time.monotonic()
        if not fresh and self._cached[0] > now:
            return self._cached[1]
        raw = await self.counters.get(self.KEY)
        state = orjson.loads(raw) if raw else None
        self._cached = (now + 1.0, state)
        return state

    async def check(self, spent_micros: int) -> None:
        if self.cap_micros is None or spent_micros < self.cap_micros:
            return
        day = period_of("daily")
        if await self.counters.get(self._lifted_key(day)) or await self.status():
            return
        state = {"since": datetime.now(UTC).isoformat(), "spent_micros": spent_micros, "cap_micros": self.cap_micros}
        await self.counters.set(self.KEY, orjson.dumps(state), ttl_s=day.ttl_s - 86400)
        self._cached = (0.0, None)
        log.error("global daily cap reached: emergency mode on", extra={"fields": state})

    async def lift(self) -> None:
        day = period_of("daily")
        await self.counters.set(self._lifted_key(day), b"1", ttl_s=day.ttl_s)
        await self.counters.delete(self.KEY)
        self._cached = (0.0, None)
        log.warning("emergency mode lifted by an administrator for the rest of the day")


class AdmissionStage:
    name = "admission"

    def __init__(
        self,
        config: KeelConfig,
        counters: Counters,
        prices: PriceBook,
        spend: SpendRepository,
        emergency: EmergencyMode,
    ) -> None:
        self.cfg = config.budgets
        self.fail_open = config.limits.failure_policy == "open"
        self.counters = counters
        self.prices = prices
        self.spend = spend
        self.emergency = emergency
        self.global_cap = emergency.cap_micros
        self._seeded: dict[str, float] = {}
        self._generation = counters.generation

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None, "auth runs before admission"
        if principal.unlimited and self.global_cap is None:
            return
        try:
            await self._admit(ctx, principal)
        except CountersUnavailable as exc:
            if not self.fail_open:
                raise
            ctx.response_headers["x-keel-limits"] = "unenforced"
            log.warning("limits backend unavailable; admitting unmetered (limits.failure_policy=open): %s", exc)

    async def _admit(self, ctx: RequestContext, principal: Principal) -> None:
        if self.global_cap is not None and await self.emergency.status():
            await self._apply_emergency(ctx)
        scopes = principal.scopes
        if any(s.soft_budget_micros is not None for s in scopes) and self.cfg.downgrade_model:
            await self._maybe_downgrade(ctx, scopes)

        prompt_tokens = estimate_usage(ctx.body.get("messages") or [], "")["prompt_tokens"]
        max_out = _max_output(ctx.body) or self.cfg.output_tokens_estimate
        model = ctx.public_model or ""
        price = self.prices.for_model(model)
        budgets = self._budgets(scopes)
        if price is None and budgets and self.cfg.unpriced == "refuse":
            raise InvalidRequest(
                f"Model {model!r} has no price, so the budgets on this key cannot be enforced. Set `price` on the "
                f"model in the config (or budgets.unpriced: allow).",
                param="model",
                code="model_unpriced",
            )
        est_cost = estimate_cost_micros(price, prompt_tokens, max_out) or 0
        budget_limits = [BudgetLimit(b.limit.key, b.limit.limit_micros, est_cost, b.period.ttl_s) for b in budgets]
        windows: list[WindowLimit] = []
        window_scopes: list[tuple[ScopeSettings, str]] = []
        leases: list[ConcurrencyLimit] = []
        for s in scopes:
            if s.rpm is not None:
                windows.append(WindowLimit(f"rpm:{s.scope}:{s.id}", s.rpm, 1))
                window_scopes.append((s, "requests"))
            if s.tpm is not None:
                windows.append(WindowLimit(f"tpm:{s.scope}:{s.id}", s.tpm, prompt_tokens + max_out))
                window_scopes.append((s, "tokens"))
            if s.max_parallel is not None:
                leases.append(ConcurrencyLimit(f"par:{s.scope}:{s.id}", s.max_parallel))
        if not (windows or leases or budget_limits):
            return
        await self._seed(budgets)
        admission = await self.counters.admit(ctx.request_id, windows, leases, budget_limits)
        _rate_headers(ctx, admission, window_scopes)
        if not admission.allowed:
            assert admission.denial is not None
            raise self._refusal(admission.denial, window_scopes, leases, budgets, ctx)
        ctx.admission = admission
        tpm_positions = [i for i, (_, kind) in enumerate(window_scopes) if kind == "tokens"]
        ctx.defer(lambda c: self._settle(c, admission, tpm_positions))

    async def charge(self, ctx: RequestContext) -> None:
        """Add the cost of a call that no admitted request settles (a session's background summary) to the budgets
        of ``ctx.principal``. It never refuses, since the work is done: a budget it fills refuses the next
        request. A budget already over its limit is left as it is (it refuses anyway)."""
        principal = ctx.principal
        if principal is None or not ctx.cost_micros:
            return
        budgets = self._budgets(principal.scopes)
        if not budgets:
            return
        try:
            await self._seed(budgets)
            admission = await self.counters.admit(f"{ctx.request_id}:charge", budgets=[b.limit for b in budgets])
            await self.counters.settle(admission, None, ctx.cost_micros)
        except CountersUnavailable as exc:
            log.error("could not charge %s to its budgets: %s", ctx.request_id, exc)

    def _budgets(self, scopes: Sequence[ScopeSettings]) -> list[_Budget]:
        out = []
        for s in scopes:
            if s.budget_micros is None:
                continue
            period = period_of(s.period)
            key = f"budget:{s.scope}:{s.id}:{period.id}"
            out.append(_Budget(s.scope, s.id, period, BudgetLimit(key, s.budget_micros, 0, period.ttl_s)))
        if self.global_cap is not None:
            day = period_of("daily")
            out.append(_Budget("global", None, day, BudgetLimit(f"budget:global:{day.id}", None, 0, day.ttl_s)))
        return out

    async def _seed(self, budgets: Sequence[_Budget]) -> None:
        if self.counters.generation != self._generation:  # Redis may have restarted empty: seed everything again
            self._generation = self.counters.generation
            self._seeded.clear()
        now = time.monotonic()
        for b in budgets:
            if self._seeded.get(b.limit.key, 0.0) > now:
                continue
            spent = await self.spend.total(b.scope, b.scope_id, since=b.period.start)  # type: ignore[arg-type]
            await self.counters.budget_seed(b.limit.key, spent, b.period.ttl_s)
            if len(self._seeded) > 100_000:
                self._seeded.clear()
            self._seeded[b.limit.key] = now + _RESEED_S

    async def _maybe_downgrade(self, ctx: RequestContext, scopes: Sequence[ScopeSettings]) -> None:
        soft = [(s, period_of(s.period)) for s in scopes if s.soft_budget_micros is not None]
        keys = [f"budget:{s.scope}:{s.id}:{p.id}" for s, p in soft]
        spent = await self.counters.budget_spent(keys)
        for (s, _), (used, _reserved) in zip(soft, spent, strict=True):
            assert s.soft_budget_micros is not None
            if used >= s.soft_budget_micros and ctx.public_model != self.cfg.downgrade_model:
                ctx.response_headers["x-keel-downgraded"] = f"{ctx.public_model}->{self.cfg.downgrade_model}"
                ctx.response_headers["x-keel-downgrade-reason"] = (
                    f"{s.scope} {s.id} spent {usd(used)} of its soft threshold {usd(s.soft_budget_micros)}"
                )
                ctx.public_model = self.cfg.downgrade_model
                return

    async def _apply_emergency(self, ctx: RequestContext) -> None:
        ctx.response_headers["x-keel-emergency"] = "global daily cap reached"
        prompt = estimate_usage(ctx.body.get("messages") or [], "")["prompt_tokens"]
        if prompt > self.cfg.emergency_max_prompt_tokens:
            raise BudgetExceeded(
                f"Keel is in emergency mode (the global daily spend cap was reached): prompts over "
                f"{self.cfg.emergency_max_prompt_tokens} tokens are refused until an administrator lifts it.",
                code="emergency_mode",
            )
        if self.cfg.emergency_model and ctx.public_model != self.cfg.emergency_model:
            ctx.response_headers["x-keel-downgraded"] = f"{ctx.public_model}->{self.cfg.emergency_model}"
            ctx.public_model = self.cfg.emergency_model

    def _refusal(
        self,
        d: Denial,
        window_scopes: Sequence[tuple[ScopeSettings, str]],
        leases: Sequence[ConcurrencyLimit],
        budgets: Sequence[_Budget],
        ctx: RequestContext,
    ) -> Exception:
        if d.kind == "window":
            scope, unit = window_scopes[d.index]
            retry = d.retry_after_s or 1.0
            return RateLimitExceeded(
                f"Rate limit reached for {scope.scope} {scope.id}: {d.limit} {unit} per minute "
                f"({d.current} used). Retry after {retry:.0f}s.",
                retry_after=retry,
                headers=dict(_limit_headers(ctx)),
                code="rate_limit_exceeded" if unit == "requests" else "tokens_rate_limit_exceeded",
            )
        if d.kind == "concurrency":
            scope_key = leases[d.index].key.split(":", 1)[1].replace(":", " ")
            return RateLimitExceeded(
                f"Too many concurrent requests for {scope_key}: at most {d.limit} at once.",
                retry_after=d.retry_after_s or 1.0,
                code="concurrency_limit_exceeded",
            )
        b = budgets[d.index]
        resets = f"resets at {b.period.end.isoformat().replace('+00:00', 'Z')}" if b.period.end else "never resets"
        return BudgetExceeded(
            f"Budget exceeded for {b.scope} {b.scope_id}: limit {usd(d.limit)}, spent {usd(d.current)} "
            f"(including requests in flight); it {resets}.",
        )

    async def _settle(self, ctx: RequestContext, admission: Admission, tpm_positions: list[int]) -> None:
        usage = ctx.usage or {}
        total = usage.get("total_tokens")
        if not isinstance(total, int):
            total = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        actuals = [w.amount for w in admission.windows]
        for i in tpm_positions:
            actuals[i] = total
        try:
            # Guardrail model calls made for this request count against its budgets (not its token windows).
            cost = (ctx.cost_micros or 0) + sum(
                cost_micros(self.prices.for_deployment(c.deployment), c.usage) or 0 for c in ctx.side_calls
            )
            await self.counters.settle(admission, actuals, cost)
            if self.global_cap is not None:
                [(spent, _)] = await self.counters.budget_spent([f"budget:global:{period_of('daily').id}"])
                await self.emergency.check(spent)
        except CountersUnavailable as exc:
            # The reservation expires by itself; the ledger still has the spend.
            log.error("could not settle limits for %s: %s", ctx.request_id, exc)


def _max_output(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _limit_headers(ctx: RequestContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in ctx.response_headers.items() if k.startswith("x-ratelimit-")]


def _rate_headers(
    ctx: RequestContext, admission: Admission, window_scopes: Sequence[tuple[ScopeSettings, str]]
) -> None:
    """OpenAI's ``x-ratelimit-*`` headers, for the most constrained window of each unit."""
    best: dict[str, tuple[int, int]] = {}
    for (_, unit), window, remaining in zip(window_scopes, admission.windows, admission.remaining, strict=False):
        if unit not in best or remaining < best[unit][1]:
            best[unit] = (window.limit, remaining)
    for unit, (limit, remaining) in best.items():
        ctx.response_headers[f"x-ratelimit-limit-{unit}"] = str(limit)
        ctx.response_headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, remaining))
