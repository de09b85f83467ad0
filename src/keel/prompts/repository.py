"""Managed prompts in the database: versions, labels and their history, experiments, feedback, per-version stats.

Every write that depends on what is there (the next version number, where a label points) starts by writing the
prompt's own row. That takes the row lock on PostgreSQL and the write lock on SQLite, so concurrent pushes and
label moves of one prompt take turns instead of numbering two versions alike or losing a history entry.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from sqlalchemy import Select, and_, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from keel.errors import InvalidRequest, NotFound
from keel.prompts.models import EXPERIMENT_UNITS, Prompt, PromptExperiment, PromptFeedback, PromptLabel, PromptLabelMove
from keel.prompts.models import PromptVersion as VersionRow
from keel.prompts.spec import NAME_PATTERN, PromptContent
from keel.store.db import Database
from keel.store.models import SpendRecord, utcnow

__all__ = ["PromptRepository", "VersionStats", "content_of"]

_NAME: Final = re.compile(NAME_PATTERN)
# A request that ended in one of these did not fail: the client left, or it succeeded.
_NOT_ERRORS: Final = ("ok", "client_closed")

VersionRef = int | Literal["latest"]


@dataclass(frozen=True, slots=True)
class VersionStats:
    """How one version did. ``version`` None: requests served from the bundled fallback file. Latencies are
    nearest-rank percentiles of the whole request; costs cover priced requests only. ``cache_hit_rate`` stays 0
    until Keel has a response cache (the ledger has nothing to count yet)."""

    version: int | None
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    avg_cost_usd: float | None
    prompt_tokens: int
    completion_tokens: int
    thumbs_up: int
    thumbs_down: int
    cache_hit_rate: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "avg_cost_usd": self.avg_cost_usd,
            "avg_prompt_tokens": round(self.prompt_tokens / self.requests, 2) if self.requests else None,
            "avg_completion_tokens": round(self.completion_tokens / self.requests, 2) if self.requests else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache_hit_rate": self.cache_hit_rate,
            "thumbs_up": self.thumbs_up,
            "thumbs_down": self.thumbs_down,
        }


def content_of(row: VersionRow) -> PromptContent:
    return PromptContent.model_validate(
        {
            **row.template,
            "variables": row.variables,
            "model": row.model,
            "params": row.params,
            "output_schema": row.output_schema,
        }
    )


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise InvalidRequest(
            f"{what} {value!r} is not valid: use letters, digits, '.', '_' or '-' (at most 100, starting with a "
            "letter or digit)",
            param=what,
        )
    return value


class PromptRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- versions ----------------------------------------------------------------------------------------------

    async def create_version(
        self, name: str, content: PromptContent, *, by: str, message: str | None = None
    ) -> tuple[VersionRow, bool]:
        """Store ``content`` as the next version of ``name`` (creating the prompt on its first version). When it is
        identical to the latest version, nothing is stored: returns ``(latest, False)``. Validate the templates
        first (:class:`~keel.prompts.render.CompiledPrompt`); this stores what it is given."""
        check_name(name, "name")
        digest = content.content_hash()
        now = utcnow()
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        async with self._db.session() as s:
            await s.execute(
                insert(Prompt)
                .values(name=name, latest_version=0, created_by=by, created_at=now, updated_at=now)
                .on_conflict_do_nothing(index_elements=[Prompt.name])
            )
            latest = await _lock(s, name)
            if latest:
                current = await s.get_one(VersionRow, (name, latest))
                if current.content_hash == digest:
                    return current, False
            data = content.canonical()
            row = VersionRow(
                prompt_name=name,
                version=latest + 1,
                template={"system": data["system"], "messages": data["messages"]},
                variables=data["variables"],
                model=data["model"],
                params=data["params"],
                output_schema=data["output_schema"],
                content_hash=digest,
                message=message,
                created_by=by,
                created_at=now,
            )
            s.add(row)
            await s.execute(update(Prompt).where(Prompt.name == name).values(latest_version=latest + 1, updated_at=now))
        return row, True

    async def get_version(self, name: str, version: VersionRef) -> VersionRow:
        """One version (``"latest"``: the newest); :class:`NotFound` when there is no such prompt or version."""
        async with self._db.session() as s:
            number = await _version_number(s, name, version)
            row = await s.get(VersionRow, (name, number))
        if row is None:
            raise NotFound(f"Prompt {name!r} has no version {version}.", code="prompt_version_not_found")
        return row

    async def versions(self, name: str) -> builtins.list[VersionRow]:
        """Every version of ``name``, oldest first."""
        async with self._db.session() as s:
            rows = builtins.list(
                await s.scalars(select(VersionRow).where(VersionRow.prompt_name == name).order_by(VersionRow.version))
            )
        if not rows:
            raise _no_prompt(name)
        return rows

    async def list(self) -> builtins.list[tuple[Prompt, dict[str, int]]]:
        """Every prompt with its labels (label → version), by name."""
        async with self._db.session() as s:
            prompts = builtins.list(await s.scalars(select(Prompt).order_by(Prompt.name)))
            labels = await s.scalars(select(PromptLabel))
        by_prompt: dict[str, dict[str, int]] = {p.name: {} for p in prompts}
        for label in labels:
            by_prompt.setdefault(label.prompt_name, {})[label.label] = label.version
        return [(p, dict(sorted(by_prompt[p.name].items()))) for p in prompts]

    # -- labels ------------------------------------------------------------------------------------------------

    async def labels(self, name: str) -> builtins.list[PromptLabel]:
        async with self._db.session() as s:
            return builtins.list(
                await s.scalars(select(PromptLabel).where(PromptLabel.prompt_name == name).order_by(PromptLabel.label))
            )

    async def history(self, name: str, label: str | None = None, limit: int = 200) -> builtins.list[PromptLabelMove]:
        """Label moves of ``name`` (one label's, or all), newest first."""
        stmt = select(PromptLabelMove).where(PromptLabelMove.prompt_name == name)
        if label is not None:
            stmt = stmt.where(PromptLabelMove.label == label)
        async with self._db.session() as s:
            return builtins.list(await s.scalars(stmt.order_by(PromptLabelMove.id.desc()).limit(limit)))

    async def set_label(
        self, name: str, label: str, version: VersionRef, *, by: str, reason: str | None = None
    ) -> PromptLabelMove | None:
        """Point ``label`` at ``version``; the move is recorded. ``None`` when it already pointed there."""
        check_name(label, "label")
        async with self._db.session() as s:
            await _lock(s, name)
            target = await _version_number(s, name, version)
            if await s.get(VersionRow, (name, target)) is None:
                raise NotFound(f"Prompt {name!r} has no version {version}.", code="prompt_version_not_found")
            return await _move(s, name, label, target, by=by, action="set", reason=reason)

    async def rollback(
        self,
        name: str,
        label: str,
        *,
        by: str,
        reason: str | None = None,
        automatic: bool = False,
        expected: int | None = None,
    ) -> PromptLabelMove | None:
        """Move ``label`` back to the version it pointed at before its last move.

        The history is a stack: setting a label pushes a version, a rollback pops one, so repeated rollbacks keep
        going back (v1, v2, v3 → v2 → v1) rather than flip-flopping. With ``expected``, only roll back if the label
        still points there (``None`` otherwise): two workers checking the same rule roll back once.
        """
        async with self._db.session() as s:
            await _lock(s, name)
            current = await s.get(PromptLabel, (name, label))
            if current is None:
                raise NotFound(f"Prompt {name!r} has no label {label!r}.", code="prompt_label_not_found")
            if expected is not None and current.version != expected:
                return None
            moves = await s.scalars(
                select(PromptLabelMove)
                .where(PromptLabelMove.prompt_name == name, PromptLabelMove.label == label)
                .order_by(PromptLabelMove.id)
            )
            stack: builtins.list[int] = []
            for move in moves:
                if move.action == "set":
                    stack.append(move.to_version)
                elif stack:
                    stack.pop()
            if len(stack) < 2:
                raise InvalidRequest(
                    f"Label {label!r} of prompt {name!r} has no earlier version to roll back to.",
                    code="nothing_to_roll_back",
                    status=409,
                )
            action = "auto-rollback" if automatic else "rollback"
            return await _move(s, name, label, stack[-2], by=by, action=action, reason=reason)

    async def label_state(
        self, name: str, label: str
    ) -> tuple[VersionRow, PromptExperiment | None, VersionRow | None] | None:
        """What resolving ``name@label`` needs in one round of queries: the version the label points at, the
        active experiment on it and that experiment's treatment version; ``None`` when the label is not set."""
        async with self._db.session() as s:
            current = await s.scalar(
                select(VersionRow)
                .join(
                    PromptLabel,
                    and_(PromptLabel.prompt_name == VersionRow.prompt_name, PromptLabel.version == VersionRow.version),
                )
                .where(PromptLabel.prompt_name == name, PromptLabel.label == label)
            )
            if current is None:
                return None
            experiment = await s.scalar(_active(name, label))
            treatment = await s.get(VersionRow, (name, experiment.treatment_version)) if experiment else None
        return current, experiment, treatment

    async def recent_moves(self, since: datetime) -> builtins.list[PromptLabelMove]:
        """Each label's last move, where that move was a "set" from an earlier version after ``since``: the label
        moves the auto-rollback rule watches."""
        last = select(func.max(PromptLabelMove.id)).group_by(PromptLabelMove.prompt_name, PromptLabelMove.label)
        stmt = select(PromptLabelMove).where(
            PromptLabelMove.id.in_(last),
            PromptLabelMove.action == "set",
            PromptLabelMove.from_version.is_not(None),
            PromptLabelMove.changed_at >= since,
        )
        async with self._db.session() as s:
            return builtins.list(await s.scalars(stmt))

    # -- experiments -------------------------------------------------------------------------------------------

    async def start_experiment(
        self,
        name: str,
        label: str,
        treatment: VersionRef,
        percent: float,
        *,
        by: str,
        unit: str = "user",
        shadow: bool = False,
        rollback_error_factor: float | None = 2.0,
        rollback_min_requests: int = 100,
    ) -> PromptExperiment:
        """Start giving ``treatment`` to ``percent`` % of the label's units (or shadowing it); the label's current
        version is the control. One active experiment per label."""
        if not 0 < percent <= 100:
            raise InvalidRequest("percent must be more than 0 and at most 100", param="percent")
        if unit not in EXPERIMENT_UNITS:
            raise InvalidRequest(f"unit must be one of {', '.join(EXPERIMENT_UNITS)}", param="unit")
        if rollback_error_factor is not None and rollback_error_factor <= 1:
            raise InvalidRequest("rollback_error_factor must be above 1", param="rollback_error_factor")
        if rollback_min_requests < 1:
            raise InvalidRequest("rollback_min_requests must be at least 1", param="rollback_min_requests")
        async with self._db.session() as s:
            await _lock(s, name)
            current = await s.get(PromptLabel, (name, label))
            if current is None:
                raise NotFound(
                    f"Prompt {name!r} has no label {label!r}; set it first (it gives the control version).",
                    code="prompt_label_not_found",
                )
            version = await _version_number(s, name, treatment)
            if await s.get(VersionRow, (name, version)) is None:
                raise NotFound(f"Prompt {name!r} has no version {treatment}.", code="prompt_version_not_found")
            if version == current.version:
                raise InvalidRequest(
                    f"Label {label!r} already points at version {version}; the treatment must differ.",
                    param="treatment_version",
                )
            running = await s.scalar(_active(name, label))
            if running is not None:
                raise InvalidRequest(
                    f"Experiment {running.id} is already running on {name}@{label}; stop it first.",
                    code="experiment_running",
                    status=409,
                )
            experiment = PromptExperiment(
                prompt_name=name,
                label=label,
                control_version=current.version,
                treatment_version=version,
                percent=percent,
                unit=unit,
                shadow=shadow,
                rollback_error_factor=rollback_error_factor,
                rollback_min_requests=rollback_min_requests,
                active=True,
                created_by=by,
                created_at=utcnow(),
            )
            s.add(experiment)
        return experiment

    async def stop_experiment(
        self, experiment_id: str, *, by: str, reason: str | None = None, promote: bool = False
    ) -> PromptExperiment | None:
        """Stop a running experiment (``None`` if it had already stopped); ``promote`` also points its label at
        the treatment version."""
        async with self._db.session() as s:
            experiment = await s.get(PromptExperiment, experiment_id)
            if experiment is None:
                raise NotFound(f"No experiment with id {experiment_id!r}.", code="experiment_not_found")
            await _lock(s, experiment.prompt_name)
            stopped = await s.scalar(
                update(PromptExperiment)
                .where(PromptExperiment.id == experiment_id, PromptExperiment.active)
                .values(active=False, stopped_by=by, stopped_at=utcnow(), stop_reason=reason)
                .returning(PromptExperiment),
                execution_options={"populate_existing": True},
            )
            if stopped is not None and promote:
                await _move(
                    s,
                    stopped.prompt_name,
                    stopped.label,
                    stopped.treatment_version,
                    by=by,
                    action="set",
                    reason=reason or f"promoted from experiment {experiment_id}",
                )
        return stopped

    async def experiments(self, name: str | None = None, active: bool | None = None) -> builtins.list[PromptExperiment]:
        stmt = select(PromptExperiment).order_by(PromptExperiment.created_at.desc())
        if name is not None:
            stmt = stmt.where(PromptExperiment.prompt_name == name)
        if active is not None:
            stmt = stmt.where(PromptExperiment.active == active)
        async with self._db.session() as s:
            return builtins.list(await s.scalars(stmt))

    # -- feedback and stats ------------------------------------------------------------------------------------

    async def request_owner(self, request_id: str) -> SpendRecord | None:
        """The ledger row of a request, to check who may rate it."""
        async with self._db.session() as s:
            return await s.scalar(select(SpendRecord).where(SpendRecord.request_id == request_id).limit(1))

    async def add_feedback(
        self, request_id: str, score: int, comment: str | None, *, key_id: str | None, user_id: str | None
    ) -> PromptFeedback:
        """Record a rating; rating the same request again replaces the earlier rating."""
        if score not in (-1, 1):
            raise InvalidRequest("score must be 1 (thumbs up) or -1 (thumbs down)", param="score")
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        stmt = insert(PromptFeedback).values(
            request_id=request_id, score=score, comment=comment, key_id=key_id, user_id=user_id, created_at=utcnow()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[PromptFeedback.request_id],
            set_={
                PromptFeedback.score: stmt.excluded.score,
                PromptFeedback.comment: stmt.excluded.comment,
                PromptFeedback.key_id: stmt.excluded.key_id,
                PromptFeedback.user_id: stmt.excluded.user_id,
                PromptFeedback.created_at: stmt.excluded.created_at,
            },
        )
        async with self._db.session() as s:
            result = await s.scalars(stmt.returning(PromptFeedback), execution_options={"populate_existing": True})
            return result.one()

    async def stats(
        self,
        name: str,
        versions: Sequence[int] | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        arms: Sequence[str] | None = None,
    ) -> builtins.list[VersionStats]:
        """Per-version figures from the spend ledger (and feedback) for requests in ``[since, until)``, optionally
        only some versions or experiment arms; ordered by version, the fallback (None) last."""
        r = SpendRecord
        filters = [r.prompt_name == name]
        if versions is not None:
            filters.append(r.prompt_version.in_(versions))
        if since is not None:
            filters.append(r.created_at >= since)
        if until is not None:
            filters.append(r.created_at < until)
        if arms is not None:
            filters.append(r.experiment_arm.in_(arms))
        ranked = (
            select(
                r.prompt_version.label("version"),
                r.latency_ms,
                r.outcome,
                r.cost_usd_micros,
                r.prompt_tokens,
                r.completion_tokens,
                func.row_number().over(partition_by=r.prompt_version, order_by=r.latency_ms).label("pos"),
                func.count().over(partition_by=r.prompt_version).label("n"),
            )
            .where(*filters)
            .subquery()
        )
        c = ranked.c
        figures = select(
            c.version,
            func.count().label("requests"),
            func.sum(case((c.outcome.in_(_NOT_ERRORS), 0), else_=1)).label("errors"),
            func.min(case((c.pos >= c.n * 0.5, c.latency_ms))).label("p50"),
            func.min(case((c.pos >= c.n * 0.95, c.latency_ms))).label("p95"),
            func.avg(c.cost_usd_micros).label("avg_cost"),
            func.sum(c.prompt_tokens).label("prompt_tokens"),
            func.sum(c.completion_tokens).label("completion_tokens"),
        ).group_by(c.version)
        f = PromptFeedback
        votes = (
            select(
                r.prompt_version.label("version"),
                func.sum(case((f.score > 0, 1), else_=0)).label("up"),
                func.sum(case((f.score < 0, 1), else_=0)).label("down"),
            )
            .join(f, f.request_id == r.request_id)
            .where(*filters)
            .group_by(r.prompt_version)
        )
        async with self._db.session() as s:
            rows = (await s.execute(figures)).mappings().all()
            feedback = {row.version: (int(row.up), int(row.down)) for row in await s.execute(votes)}
        # PostgreSQL's SUM and AVG are NUMERIC (Decimal in Python): plain numbers on both databases.
        out = [
            VersionStats(
                version=row["version"],
                requests=int(row["requests"]),
                errors=int(row["errors"]),
                p50_ms=_float(row["p50"]),
                p95_ms=_float(row["p95"]),
                avg_cost_usd=None if row["avg_cost"] is None else round(float(row["avg_cost"]) / 1_000_000, 8),
                prompt_tokens=int(row["prompt_tokens"] or 0),
                completion_tokens=int(row["completion_tokens"] or 0),
                thumbs_up=feedback.get(row["version"], (0, 0))[0],
                thumbs_down=feedback.get(row["version"], (0, 0))[1],
            )
            for row in rows
        ]
        return sorted(out, key=lambda v: (v.version is None, v.version or 0))


async def _lock(s: AsyncSession, name: str) -> int:
    """Write the prompt's row (a no-op change) to serialize with other writers; returns its latest version."""
    latest = await s.scalar(
        update(Prompt)
        .where(Prompt.name == name)
        .values(latest_version=Prompt.latest_version)
        .returning(Prompt.latest_version)
    )
    if latest is None:
        raise _no_prompt(name)
    return int(latest)


async def _version_number(s: AsyncSession, name: str, version: VersionRef) -> int:
    if version != "latest":
        return version
    latest = await s.scalar(select(Prompt.latest_version).where(Prompt.name == name))
    if latest is None:
        raise _no_prompt(name)
    return latest


async def _move(
    s: AsyncSession, name: str, label: str, version: int, *, by: str, action: str, reason: str | None
) -> PromptLabelMove | None:
    now = utcnow()
    current = await s.get(PromptLabel, (name, label))
    before = current.version if current else None
    if before == version:
        return None
    if current is None:
        s.add(PromptLabel(prompt_name=name, label=label, version=version, updated_by=by, updated_at=now))
    else:
        current.version, current.updated_by, current.updated_at = version, by, now
    move = PromptLabelMove(
        prompt_name=name,
        label=label,
        from_version=before,
        to_version=version,
        action=action,
        changed_by=by,
        changed_at=now,
        reason=reason,
    )
    s.add(move)
    return move


def _active(name: str, label: str) -> Select[PromptExperiment]:
    return select(PromptExperiment).where(
        PromptExperiment.prompt_name == name, PromptExperiment.label == label, PromptExperiment.active
    )


def _float(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _no_prompt(name: str) -> NotFound:
    return NotFound(
        f"No prompt named {name!r}; create it with `keel prompts push DIR` or POST /v1/admin/prompts/{name}/versions.",
        code="prompt_not_found",
    )
