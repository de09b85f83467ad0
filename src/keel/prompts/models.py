"""Managed prompts as tables, on the same ``Base`` (and so the same migrations) as the rest of Keel's store.

Versions are immutable rows: a change is a new ``(prompt_name, version)``; nothing is updated in place. A label is a
movable pointer at a version, and every move is appended to ``prompt_label_history``, which is what makes a rollback
("back to what it pointed at before") and "who changed what when" answerable. Schema changes here need an Alembic
revision (``0002_prompts`` created these tables).
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base, utcnow

__all__ = [
    "EXPERIMENT_UNITS",
    "LABEL_ACTIONS",
    "Prompt",
    "PromptExperiment",
    "PromptFeedback",
    "PromptLabel",
    "PromptLabelMove",
    "PromptVersion",
]

EXPERIMENT_UNITS: Final = ("user", "session")
# "set" pushes a version on the label's stack; a rollback pops one (see PromptRepository.rollback).
LABEL_ACTIONS: Final = ("set", "rollback", "auto-rollback")

_BIGINT_PK = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY


def _in(column: str, values: tuple[str, ...]) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=f"{column}_valid")


class Prompt(Base):
    """One managed prompt. ``latest_version`` is bumped under a row lock, which serializes concurrent pushes."""

    __tablename__ = "prompts"

    name: Mapped[str] = mapped_column(primary_key=True)
    latest_version: Mapped[int] = mapped_column(default=0)
    created_by: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptVersion(Base):
    """An immutable version. ``template`` holds ``{"system": str | None, "messages": [{"role", "content"}]}``;
    ``content_hash`` (sha256 of the canonical content) lets a push of unchanged content create nothing."""

    __tablename__ = "prompt_versions"

    prompt_name: Mapped[str] = mapped_column(ForeignKey("prompts.name"), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    template: Mapped[dict[str, Any]]
    variables: Mapped[dict[str, Any]]
    model: Mapped[str | None]
    params: Mapped[dict[str, Any]]
    output_schema: Mapped[dict[str, Any] | None]
    content_hash: Mapped[str]
    message: Mapped[str | None]
    created_by: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptLabel(Base):
    """Where a label points now."""

    __tablename__ = "prompt_labels"
    __table_args__ = (
        ForeignKeyConstraint(["prompt_name", "version"], ["prompt_versions.prompt_name", "prompt_versions.version"]),
    )

    prompt_name: Mapped[str] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(primary_key=True)
    version: Mapped[int]
    updated_by: Mapped[str]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptLabelMove(Base):
    """One move of a label, appended on every change and never edited."""

    __tablename__ = "prompt_label_history"
    __table_args__ = (
        ForeignKeyConstraint(["prompt_name", "to_version"], ["prompt_versions.prompt_name", "prompt_versions.version"]),
        Index(None, "prompt_name", "label"),
        _in("action", LABEL_ACTIONS),
    )

    id: Mapped[int] = mapped_column(_BIGINT_PK, primary_key=True, autoincrement=True)
    prompt_name: Mapped[str]
    label: Mapped[str]
    from_version: Mapped[int | None]
    to_version: Mapped[int]
    action: Mapped[str]
    changed_by: Mapped[str]
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str | None]


class PromptExperiment(Base):
    """Version ``treatment_version`` for ``percent`` % of units (users or sessions) following ``label``, or, with
    ``shadow``, run on a copy of their traffic and never shown. At most one active experiment per label (a partial
    unique index). The auto-rollback rule is off when ``rollback_error_factor`` is NULL."""

    __tablename__ = "prompt_experiments"
    __table_args__ = (
        ForeignKeyConstraint(
            ["prompt_name", "control_version"],
            ["prompt_versions.prompt_name", "prompt_versions.version"],
            name="fk_prompt_experiments_control_version",
        ),
        ForeignKeyConstraint(
            ["prompt_name", "treatment_version"],
            ["prompt_versions.prompt_name", "prompt_versions.version"],
            name="fk_prompt_experiments_treatment_version",
        ),
        Index(
            "uq_prompt_experiments_active_label",
            "prompt_name",
            "label",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
        _in("unit", EXPERIMENT_UNITS),
        CheckConstraint("percent > 0 AND percent <= 100", name="percent_valid"),
    )

    id: Mapped[str] = mapped_column(primary_key=True, default=lambda: "exp_" + secrets.token_hex(8))
    prompt_name: Mapped[str]
    label: Mapped[str]
    control_version: Mapped[int]
    treatment_version: Mapped[int]
    percent: Mapped[float]
    unit: Mapped[str]
    shadow: Mapped[bool]
    rollback_error_factor: Mapped[float | None]
    rollback_min_requests: Mapped[int]
    active: Mapped[bool]
    created_by: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_by: Mapped[str | None]
    stopped_at: Mapped[datetime | None]
    stop_reason: Mapped[str | None]


class PromptFeedback(Base):
    """A thumbs up (+1) or down (-1) on one request; a second rating of the same request replaces the first."""

    __tablename__ = "prompt_feedback"
    __table_args__ = (CheckConstraint("score IN (-1, 1)", name="score_valid"),)

    id: Mapped[int] = mapped_column(_BIGINT_PK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(unique=True)
    score: Mapped[int]
    comment: Mapped[str | None]
    key_id: Mapped[str | None]
    user_id: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
