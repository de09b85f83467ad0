"""Running an app's checks on one text and turning their findings into one verdict.

Checks run concurrently (the slowest one sets the cost, not their sum), each under its own timeout. Their
findings then mean what the app's config says: any ``block`` finding blocks; ``redact`` findings have their spans
merged and replaced by ``<ENTITY>`` in the text the model (or the client) then sees; ``warn`` findings are only
logged and counted. A check that raises or times out follows its ``on_error`` policy: ``closed`` blocks with reason
``guardrail_unavailable``, ``open`` lets the text through; both are logged and counted, never silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from keel.guard.base import Action, Check, Direction, Finding, GuardInput, Span
from keel.observe.metrics import observe_guard_check, observe_guardrails

__all__ = ["UNAVAILABLE", "ConfiguredCheck", "GuardRunner", "OnError", "Verdict", "merge_spans", "redact"]

log = logging.getLogger("keel.guard")

OnError = Literal["open", "closed"]
Outcome = Literal["allow", "warn", "redact", "block"]
UNAVAILABLE: Final = "guardrail_unavailable"
_RANK: Final = {"allow": 0, "warn": 1, "redact": 2, "block": 3}


@dataclass(frozen=True, slots=True)
class ConfiguredCheck:
    """A built check with its policy from config. ``label`` names it in reasons, timings and metrics: the check's
    config name, with ``#2``, ``#3`` ... when one list names the same check more than once."""

    label: str
    check: Check
    action: Action
    timeout_s: float
    on_error: OnError

    @property
    def whole_text(self) -> bool:
        """Whether the check needs the whole answer (``json_schema``), not a window of it: on a stream it runs
        once, at the end. A check says so with a ``stream_scope = "whole"`` attribute."""
        return getattr(self.check, "stream_scope", "window") == "whole"


@dataclass(slots=True)
class Verdict:
    """What the checks decided about one text. ``text`` has the redactions applied (also when blocked, so it never
    echoes what was masked); ``spans`` are the merged redacted spans, in the checked text's offsets; ``reasons``
    lists every finding that was acted on, each with the ``action`` taken."""

    action: Outcome
    text: str
    reasons: list[dict[str, Any]]
    spans: list[Span]
    latency_ms: float
    checks: dict[str, float]

    @property
    def allowed(self) -> bool:
        return self.action != "block"

    @property
    def blocking(self) -> list[dict[str, Any]]:
        """The reasons that blocked, without the ``action`` key (what a refusal carries)."""
        return [{k: v for k, v in r.items() if k != "action"} for r in self.reasons if r["action"] == "block"]


def merge_spans(spans: Iterable[Span], length: int) -> list[Span]:
    """Spans clipped to ``[0, length)``, sorted and with overlapping ones merged (the longer one names the entity),
    so one entity found by two checks is masked once."""
    clipped = sorted(
        (Span(max(0, s.start), min(length, s.end), s.entity) for s in spans if min(length, s.end) > max(0, s.start)),
        key=lambda s: (s.start, -s.end),
    )
    merged: list[Span] = []
    for span in clipped:
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            entity = last.entity if last.end - last.start >= span.end - span.start else span.entity
            merged[-1] = Span(last.start, max(last.end, span.end), entity)
        else:
            merged.append(span)
    return merged


def redact(text: str, spans: Sequence[Span]) -> str:
    """``text`` with each of the (merged, sorted) ``spans`` replaced by ``<ENTITY>``."""
    if not spans:
        return text
    parts: list[str] = []
    at = 0
    for span in spans:
        parts += [text[at : span.start], f"<{span.entity}>"]
        at = span.end
    parts.append(text[at:])
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class _Result:
    check: ConfiguredCheck
    findings: list[Finding]
    ms: float
    failure: str | None = None  # "error" | "timeout"
    error: str = ""  # the exception, for the log line


class GuardRunner:
    """The checks of one app and direction. :meth:`run` is all a route, the check-only API or a benchmark calls."""

    def __init__(self, app: str, direction: Direction, checks: Sequence[ConfiguredCheck]) -> None:
        self.app = app
        self.direction = direction
        self.checks = tuple(checks)

    async def run(
        self, inp: GuardInput, *, checks: Sequence[ConfiguredCheck] | None = None, request_id: str | None = None
    ) -> Verdict:
        """Run ``checks`` (default: all of them) on ``inp`` concurrently and combine their findings."""
        selected = self.checks if checks is None else tuple(checks)
        started = time.perf_counter()
        if len(selected) == 1:  # no task to spawn for a single check
            results = [await self._one(selected[0], inp)]
        else:
            results = list(await asyncio.gather(*(self._one(c, inp) for c in selected)))
        elapsed = time.perf_counter() - started
        observe_guardrails(self.direction, elapsed)
        return self._combine(inp.text, results, elapsed * 1000, request_id)

    async def _one(self, c: ConfiguredCheck, inp: GuardInput) -> _Result:
        started = time.perf_counter()
        failure: str | None = None
        error = ""
        findings: list[Finding] = []
        try:
            async with asyncio.timeout(c.timeout_s):
                findings = list(await c.check.check(inp))
        except TimeoutError:
            failure = "timeout"
        except Exception as exc:
            failure, error = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
        seconds = time.perf_counter() - started
        outcome = failure or (c.action if findings else "pass")
        observe_guard_check(c.label, self.direction, outcome, seconds)
        return _Result(c, findings, seconds * 1000, failure, error)

    def _combine(self, text: str, results: list[_Result], ms: float, request_id: str | None) -> Verdict:
        action: Outcome = "allow"
        reasons: list[dict[str, Any]] = []
        spans: list[Span] = []
        for r in results:
            c = r.check
            if r.failure is not None:
                policy = "blocked" if c.on_error == "closed" else "let through"
                detail = (
                    f"the {c.label} check timed out after {c.timeout_s * 1000:.0f} ms"
                    if r.failure == "timeout"
                    else f"the {c.label} check failed"
                )
                logged = f"{detail} ({r.error})" if r.error else detail
                self._log(f"guardrail unavailable, {policy} (on_error: {c.on_error})", c, logged, request_id)
                if c.on_error == "closed":
                    reasons.append({"check": c.label, "reason": UNAVAILABLE, "detail": detail, "action": "block"})
                    action = "block"
                continue
            for f in r.findings:
                taken: Outcome = c.action
                if taken == "redact":
                    if f.spans:
                        spans += f.spans
                    else:  # nothing to mask: the configured intent was that this must not pass
                        taken = "block"
                reason: dict[str, Any] = {"check": c.label, "reason": f.reason, "detail": f.detail}
                if f.score is not None:
                    reason["score"] = round(f.score, 4)
                reasons.append({**reason, "action": taken})
                if _RANK[taken] > _RANK[action]:
                    action = taken
                if taken == "warn":
                    self._log(f"guardrail warning: {f.reason}", c, f.detail, request_id)
        merged = merge_spans(spans, len(text))
        checks = {r.check.label: round(r.ms, 3) for r in results}
        return Verdict(action, redact(text, merged), reasons, merged, ms, checks)

    def _log(self, message: str, c: ConfiguredCheck, detail: str, request_id: str | None) -> None:
        fields = {"app": self.app, "check": c.label, "direction": self.direction, "detail": detail}
        if request_id:
            fields["request_id"] = request_id
        log.warning(message, extra={"fields": fields})
