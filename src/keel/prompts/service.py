"""Resolving managed prompts on the hot path, experiments, per-version stats and the auto-rollback rule.

``resolve(name, label)`` answers from an in-process cache refreshed every ``ttl_s`` (5 s by default), so a label
moved on one worker (a rollback, a promotion) is followed by every worker within seconds, with no restart and at
most one database round trip per label per TTL per worker (concurrent misses share one fetch).

Failure policy: resolving never fails a request when something can be served. If the store is unreachable (or
slow: ``fetch_timeout_s``), the last version fetched for that label is served (``source="last-known"``) and the
store is retried once per TTL; with nothing fetched yet, or when the label was never set, the bundled fallback
(the prompt's file in the prompts directory, ``source="fallback"``, version None) is served. Only with no fallback
either does resolving raise.

Experiments: a unit (user, or session) is in the treatment when ``sha256(f"{name}:{experiment_id}:{unit_id}")``
mod 10000 is below ``percent * 100``: stable for a unit within one experiment, independent across experiments.
Requests without a unit id get the control. A shadow experiment serves the control to everyone and runs the
treatment on a copy of the traffic of the units that fall in its share (see :mod:`keel.pipeline.prompt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from keel.config import AppConfig
from keel.context import RequestContext
from keel.errors import InvalidRequest, KeelError, NotFound
from keel.prompts.models import PromptExperiment
from keel.prompts.models import PromptVersion as VersionRow
from keel.prompts.render import CompiledPrompt
from keel.prompts.repository import PromptRepository, VersionStats, content_of
from keel.prompts.spec import PromptContent, load_prompt_dir
from keel.store.db import Database
from keel.store.models import utcnow

__all__ = [
    "AUTO_ROLLBACK",
    "ManagedSystemPrompt",
    "PromptService",
    "PromptSnapshot",
    "ResolvedPrompt",
    "RollbackEvent",
    "RollbackRule",
    "ShadowScheduler",
    "in_treatment",
]

log = logging.getLogger("keel.prompts")

AUTO_ROLLBACK: Final = "keel:auto-rollback"
Arm = Literal["control", "treatment"]
Source = Literal["store", "last-known", "fallback"]


def in_treatment(name: str, experiment_id: str, unit_id: str, percent: float) -> bool:
    """The stable arm assignment (see the module docstring)."""
    digest = hashlib.sha256(f"{name}:{experiment_id}:{unit_id}".encode()).hexdigest()
    return int(digest, 16) % 10_000 < percent * 100


@dataclass(frozen=True, slots=True)
class PromptSnapshot:
    """One version, compiled. ``version`` None: the bundled fallback file, not a stored version."""

    name: str
    version: int | None
    content: PromptContent
    template: CompiledPrompt

    @property
    def ref(self) -> str:
        """``name@version`` (``name@fallback``): the ``x-keel-prompt`` header."""
        return f"{self.name}@{'fallback' if self.version is None else self.version}"


@dataclass(frozen=True, slots=True)
class ResolvedPrompt:
    """What one request uses: the version to serve, its experiment arm, and the version to shadow (if any)."""

    prompt: PromptSnapshot
    label: str
    source: Source
    arm: Arm | None = None
    experiment_id: str | None = None
    shadow: PromptSnapshot | None = None

    @property
    def name(self) -> str:
        return self.prompt.name

    @property
    def version(self) -> int | None:
        return self.prompt.version

    @property
    def model(self) -> str | None:
        return self.prompt.content.model

    @property
    def params(self) -> dict[str, Any]:
        return self.prompt.content.params

    @property
    def output_schema(self) -> dict[str, Any] | None:
        return self.prompt.content.output_schema


@dataclass(frozen=True, slots=True)
class RollbackRule:
    """When a label move or an experiment is rolled back automatically: the new version failed more than ``factor``
    times as often as the version before it, over at least ``min_requests`` of its requests. The baseline error
    rate counts as at least ``floor``, so one error against a flawless baseline does not trigger it. A label move
    is watched for ``watch_s`` after it happened, and compared with the old version's requests in the same span
    before it. Experiments carry their own factor and minimum."""

    factor: float = 2.0
    min_requests: int = 100
    floor: float = 0.01
    watch_s: float = 24 * 3600.0
    interval_s: float = 30.0

    def verdict(self, new: VersionStats | None, old: VersionStats | None, factor: float, min_requests: int) -> str:
        """Why to roll back, or ``""`` to keep going."""
        if new is None or new.requests < min_requests:
            return ""
        old_rate = old.error_rate if old else 0.0
        if new.error_rate <= factor * max(old_rate, self.floor):
            return ""
        old_name = f"v{old.version}" if old else "the previous version"
        return (
            f"v{new.version} failed {new.error_rate:.1%} of {new.requests} requests, over {factor:g}x "
            f"{old_name}'s {old_rate:.1%} (floor {self.floor:.1%})"
        )


@dataclass(frozen=True, slots=True)
class RollbackEvent:
    prompt: str
    label: str
    kind: Literal["label", "experiment"]
    from_version: int
    to_version: int
    reason: str
    experiment_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Experiment:
    id: str
    percent: float
    unit: str
    shadow: bool


@dataclass(frozen=True, slots=True)
class _LabelState:
    current: PromptSnapshot
    experiment: _Experiment | None
    treatment: PromptSnapshot | None


@dataclass(frozen=True, slots=True)
class _Entry:
    state: _LabelState | None  # None: the label is not set (or nothing is known and the store is down)
    expires: float
    source: Source
    error: Exception | None = None


class PromptService:
    """Managed prompts for the rest of Keel: resolve and render on the hot path, stats, and the auto-rollback
    rule (:meth:`check_rollbacks`, run every ``rule.interval_s`` between :meth:`start` and :meth:`aclose`)."""

    def __init__(
        self,
        db: Database,
        fallback_dir: Path | None = None,
        *,
        ttl_s: float = 5.0,
        fetch_timeout_s: float = 2.0,
        rule: RollbackRule | None = None,
        known_models: Collection[str] | None = None,
    ) -> None:
        self.repo = PromptRepository(db)
        self.known_models = known_models
        self.ttl_s = ttl_s
        self.fetch_timeout_s = fetch_timeout_s
        self.rule = rule or RollbackRule()
        self.fallbacks: dict[str, PromptSnapshot] = {}
        if fallback_dir is not None and fallback_dir.is_dir():
            for spec in load_prompt_dir(fallback_dir):
                content = spec.content()
                self.fallbacks[spec.name] = PromptSnapshot(
                    spec.name, None, content, CompiledPrompt(content, f"{spec.name}@fallback")
                )
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._fetches: dict[tuple[str, str], asyncio.Task[_Entry]] = {}
        self._compiled: dict[tuple[str, int], PromptSnapshot] = {}
        self._checker: asyncio.Task[None] | None = None

    async def push(
        self, name: str, content: PromptContent, *, by: str, message: str | None = None
    ) -> tuple[VersionRow, bool]:
        """Store ``content`` as the next version of ``name`` unless it equals the latest (then ``created`` is
        False). Templates and the model are checked first, so what would fail on a request fails here."""
        CompiledPrompt(content, f"{name}@new")
        if content.model is not None and self.known_models is not None and content.model not in self.known_models:
            raise InvalidRequest(
                f"Prompt {name!r} asks for model {content.model!r}, which is not configured; known: "
                f"{', '.join(self.known_models)}.",
                param="model",
            )
        return await self.repo.create_version(name, content, by=by, message=message)

    # -- resolving ---------------------------------------------------------------------------------------------

    async def resolve(
        self, name: str, label: str = "production", *, user_id: str | None = None, session_id: str | None = None
    ) -> ResolvedPrompt:
        """The version of ``name`` to use for this unit under ``label`` (see the module docstring). The
        experiment's ``unit`` says which id is hashed; a session experiment falls back to the user id."""
        key = (name, label)
        entry = self._entries.get(key)
        if entry is None or entry.expires <= time.monotonic():
            entry = await self._refresh(key)
        state = entry.state
        if state is None:
            fallback = self.fallbacks.get(name)
            if fallback is None:
                if entry.error is not None:
                    raise KeelError(
                        f"The prompt store is unavailable and prompt {name!r} has no bundled fallback file.",
                        code="prompt_store_unavailable",
                        status=503,
                    )
                raise NotFound(
                    f"Prompt {name!r} has no label {label!r}: push it (`keel prompts push DIR`) and point the label "
                    f"at a version (`keel prompts label {name} latest --label {label}`).",
                    code="prompt_not_found",
                )
            return ResolvedPrompt(fallback, label, "fallback")
        experiment = state.experiment
        if experiment is None or state.treatment is None:
            return ResolvedPrompt(state.current, label, entry.source)
        unit_id = (session_id or user_id) if experiment.unit == "session" else user_id
        treated = unit_id is not None and in_treatment(name, experiment.id, unit_id, experiment.percent)
        if experiment.shadow:
            shadow = state.treatment if treated else None
            return ResolvedPrompt(state.current, label, entry.source, "control", experiment.id, shadow)
        if treated:
            return ResolvedPrompt(state.treatment, label, entry.source, "treatment", experiment.id)
        return ResolvedPrompt(state.current, label, entry.source, "control", experiment.id)

    async def version(self, name: str, version: int | Literal["latest"]) -> PromptSnapshot:
        """One stored version, compiled (to render a version no label points at: previews, evaluations)."""
        return self._snapshot(await self.repo.get_version(name, version))

    def render(self, resolved: ResolvedPrompt, variables: Mapping[str, object]) -> list[dict[str, str]]:
        """The resolved version's messages (see :class:`~keel.prompts.render.CompiledPrompt`)."""
        return resolved.prompt.template.render(variables)

    def invalidate(self, name: str | None = None) -> None:
        """Drop cached labels (of one prompt, or all), after this process changed them."""
        for key in [k for k in self._entries if name is None or k[0] == name]:
            del self._entries[key]

    async def _refresh(self, key: tuple[str, str]) -> _Entry:
        """One fetch per label at a time; the others wait for it. Shielded, so a caller that goes away does not
        cancel the fetch the others wait on."""
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            self._fetches[key] = task
            task.add_done_callback(lambda _: self._fetches.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: tuple[str, str]) -> _Entry:
        previous = self._entries.get(key)
        expires = time.monotonic() + self.ttl_s
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                found = await self.repo.label_state(*key)
        except Exception as exc:  # any store failure: serve what is known, never fail the request on it
            stale = previous.state if previous else None
            if previous is None or previous.error is None:
                log.warning(
                    "prompt store unavailable for %s@%s; serving the %s until it answers",
                    *key,
                    "last known version" if stale else "bundled fallback",
                    exc_info=True,
                )
            entry = _Entry(stale, expires, "last-known", exc)
        else:
            if previous is not None and previous.error is not None:
                log.info("prompt store reachable again for %s@%s", *key)
            if found is None and (previous is None or previous.state is not None) and key[0] in self.fallbacks:
                log.warning("prompt label %s@%s is not set; serving the bundled fallback", *key)
            entry = _Entry(None if found is None else self._state(*found), expires, "store")
        self._entries[key] = entry
        return entry

    def _state(
        self, current: VersionRow, experiment: PromptExperiment | None, treatment: VersionRow | None
    ) -> _LabelState:
        exp = None
        if experiment is not None:
            exp = _Experiment(experiment.id, experiment.percent, experiment.unit, experiment.shadow)
        return _LabelState(self._snapshot(current), exp, None if treatment is None else self._snapshot(treatment))

    def _snapshot(self, row: VersionRow) -> PromptSnapshot:
        """Compiled once per version: versions never change."""
        key = (row.prompt_name, row.version)
        snapshot = self._compiled.get(key)
        if snapshot is None:
            content = content_of(row)
            snapshot = PromptSnapshot(
                row.prompt_name, row.version, content, CompiledPrompt(content, f"{row.prompt_name}@{row.version}")
            )
            self._compiled[key] = snapshot
        return snapshot

    # -- stats and the auto-rollback rule ----------------------------------------------------------------------

    async def stats(
        self, name: str, versions: list[int] | None = None, since: datetime | None = None
    ) -> list[VersionStats]:
        """Per-version requests, error rate, latency, cost, tokens and feedback (see
        :class:`~keel.prompts.repository.VersionStats`)."""
        return await self.repo.stats(name, versions, since=since)

    async def check_rollbacks(self) -> list[RollbackEvent]:
        """Apply the rule once: stop failing experiments, move failing labels back. Safe from several workers at
        once (each rollback is conditional on nothing having moved meanwhile)."""
        events = []
        for exp in await self.repo.experiments(active=True):
            if exp.rollback_error_factor is None:
                continue
            since = exp.created_at
            treated = await self.repo.stats(
                exp.prompt_name, [exp.treatment_version], since=since, arms=["shadow" if exp.shadow else "treatment"]
            )
            control = await self.repo.stats(exp.prompt_name, [exp.control_version], since=since, arms=["control"])
            why = self.rule.verdict(
                _first(treated), _first(control), exp.rollback_error_factor, exp.rollback_min_requests
            )
            if why and await self.repo.stop_experiment(exp.id, by=AUTO_ROLLBACK, reason=why):
                events.append(
                    RollbackEvent(
                        exp.prompt_name,
                        exp.label,
                        "experiment",
                        exp.treatment_version,
                        exp.control_version,
                        why,
                        exp.id,
                    )
                )
        watch = timedelta(seconds=self.rule.watch_s)
        for move in await self.repo.recent_moves(utcnow() - watch):
            assert move.from_version is not None
            new = await self.repo.stats(move.prompt_name, [move.to_version], since=move.changed_at)
            old = await self.repo.stats(
                move.prompt_name, [move.from_version], since=move.changed_at - watch, until=move.changed_at
            )
            why = self.rule.verdict(_first(new), _first(old), self.rule.factor, self.rule.min_requests)
            if not why:
                continue
            back = await self.repo.rollback(
                move.prompt_name, move.label, by=AUTO_ROLLBACK, reason=why, automatic=True, expected=move.to_version
            )
            if back is not None:
                events.append(
                    RollbackEvent(move.prompt_name, move.label, "label", move.to_version, back.to_version, why)
                )
        for event in events:
            self.invalidate(event.prompt)
            log.warning(
                "auto-rollback of %s@%s: %s",
                event.prompt,
                event.label,
                event.reason,
                extra={
                    "fields": {"kind": event.kind, "to_version": event.to_version, "experiment": event.experiment_id}
                },
            )
        return events

    async def start(self) -> None:
        """Run :meth:`check_rollbacks` every ``rule.interval_s`` in the background."""
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_forever(), name="keel prompt auto-rollback")

    async def aclose(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.rule.interval_s)
            try:
                await self.check_rollbacks()
            except Exception:
                log.warning("prompt auto-rollback check failed; retrying in %gs", self.rule.interval_s, exc_info=True)


def _first(stats: list[VersionStats]) -> VersionStats | None:
    return stats[0] if stats else None


class ShadowScheduler(Protocol):
    """Runs a shadow version on a copy of a request once it is complete (:class:`keel.pipeline.prompt.ShadowRunner`)."""

    def schedule(
        self,
        ctx: RequestContext,
        resolved: ResolvedPrompt,
        served: list[dict[str, str]],
        variables: Mapping[str, object],
    ) -> None: ...


class ManagedSystemPrompt:
    """The system prompt for app routes: an app's system messages from its managed prompt (or its static
    ``system_prompt`` when it names none).

    Resolving records the version and arm on ``ctx`` (ledger and log line) and in the response headers
    (``x-keel-prompt``, and ``x-keel-experiment-arm`` during an experiment), and hands a shadow experiment's
    treatment to the shadow scheduler. The unit id is the request's ``user`` field, else the caller's user id, and
    ``ctx.session_id`` for session experiments.
    """

    def __init__(self, prompts: PromptService, shadow: ShadowScheduler | None = None) -> None:
        self.prompts = prompts
        self.shadow = shadow

    async def system_messages(
        self, app: AppConfig, ctx: RequestContext, variables: Mapping[str, object], context: str | None = None
    ) -> list[dict[str, Any]]:
        return list((await self.prepare(app, ctx, variables, context))[1])

    async def prepare(
        self, app: AppConfig, ctx: RequestContext, variables: Mapping[str, object], context: str | None = None
    ) -> tuple[ResolvedPrompt | None, list[dict[str, str]]]:
        """The resolved prompt (None for a static one) and its rendered messages.

        Keel fills two variables the caller did not set, when the prompt declares them: ``context`` (the retrieved
        knowledge; a prompt without that variable gets it as a system message after its own) and ``today``."""
        extra = [{"role": "system", "content": context}] if context else []
        if app.prompt is None:
            static = [{"role": "system", "content": app.system_prompt}] if app.system_prompt else []
            return None, [*static, *extra]
        user = ctx.body.get("user")
        user_id = user if isinstance(user, str) and user else (ctx.principal.user_id if ctx.principal else None)
        resolved = await self.prompts.resolve(
            app.prompt.name, app.prompt.label, user_id=user_id, session_id=ctx.session_id
        )
        ctx.prompt_name, ctx.prompt_version, ctx.experiment_arm = resolved.name, resolved.version, resolved.arm
        ctx.response_headers["x-keel-prompt"] = resolved.prompt.ref
        if resolved.arm is not None:
            ctx.response_headers["x-keel-experiment-arm"] = resolved.arm
        declared = resolved.prompt.template.variables
        values = dict(variables)
        if "today" in declared and "today" not in values:
            values["today"] = date.today().isoformat()
        if "context" in declared and "context" not in values:
            values["context"], extra = context or "", []
        messages = self.prompts.render(resolved, values)
        if resolved.shadow is not None and self.shadow is not None:
            self.shadow.schedule(ctx, resolved, messages, values)
        return resolved, [*messages, *extra]
