"""Managed prompts: versions, labels and their history, experiments, feedback.

Revision ID: 0002_prompts
Revises: 0001_keys_limits_spend
Create Date: 2026-11-24

A branch of its own off the base (``Database.migrate`` upgrades every head). Types are spelled out here, as in
0001, so this revision keeps meaning the same schema when the models move on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_prompts"
down_revision: str | None = "0001_keys_limits_spend"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VERSION_COLUMNS = ["prompt_versions.prompt_name", "prompt_versions.version"]


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _bigint_pk() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_prompts")),
    )
    op.create_table(
        "prompt_versions",
        sa.Column("prompt_name", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("template", _json(), nullable=False),
        sa.Column("variables", _json(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("params", _json(), nullable=False),
        sa.Column("output_schema", _json(), nullable=True),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("message", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(["prompt_name"], ["prompts.name"], name=op.f("fk_prompt_versions_prompt_name_prompts")),
        sa.PrimaryKeyConstraint("prompt_name", "version", name=op.f("pk_prompt_versions")),
    )
    op.create_table(
        "prompt_labels",
        sa.Column("prompt_name", sa.String(), nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_name", "version"], _VERSION_COLUMNS, name=op.f("fk_prompt_labels_prompt_name_prompt_versions")
        ),
        sa.PrimaryKeyConstraint("prompt_name", "label", name=op.f("pk_prompt_labels")),
    )
    op.create_table(
        "prompt_label_history",
        sa.Column("id", _bigint_pk(), autoincrement=True, nullable=False),
        sa.Column("prompt_name", sa.String(), nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("changed_by", sa.String(), nullable=False),
        sa.Column("changed_at", _timestamp(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.CheckConstraint(
            "action IN ('set', 'rollback', 'auto-rollback')", name=op.f("ck_prompt_label_history_action_valid")
        ),
        sa.ForeignKeyConstraint(
            ["prompt_name", "to_version"],
            _VERSION_COLUMNS,
            name=op.f("fk_prompt_label_history_prompt_name_prompt_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_label_history")),
    )
    op.create_index(op.f("ix_prompt_label_history_prompt_name_label"), "prompt_label_history", ["prompt_name", "label"])
    op.create_table(
        "prompt_experiments",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("prompt_name", sa.String(), nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("control_version", sa.Integer(), nullable=False),
        sa.Column("treatment_version", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Double(), nullable=False),
        sa.Column("unit", sa.String(), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("rollback_error_factor", sa.Double(), nullable=True),
        sa.Column("rollback_min_requests", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("stopped_by", sa.String(), nullable=True),
        sa.Column("stopped_at", _timestamp(), nullable=True),
        sa.Column("stop_reason", sa.String(), nullable=True),
        sa.CheckConstraint("unit IN ('user', 'session')", name=op.f("ck_prompt_experiments_unit_valid")),
        sa.CheckConstraint("percent > 0 AND percent <= 100", name=op.f("ck_prompt_experiments_percent_valid")),
        sa.ForeignKeyConstraint(
            ["prompt_name", "control_version"], _VERSION_COLUMNS, name="fk_prompt_experiments_control_version"
        ),
        sa.ForeignKeyConstraint(
            ["prompt_name", "treatment_version"], _VERSION_COLUMNS, name="fk_prompt_experiments_treatment_version"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_experiments")),
    )
    op.create_index(
        "uq_prompt_experiments_active_label",
        "prompt_experiments",
        ["prompt_name", "label"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )
    op.create_table(
        "prompt_feedback",
        sa.Column("id", _bigint_pk(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("comment", sa.String(), nullable=True),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("user_id", sa.String(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.CheckConstraint("score IN (-1, 1)", name=op.f("ck_prompt_feedback_score_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_feedback")),
        sa.UniqueConstraint("request_id", name=op.f("uq_prompt_feedback_request_id")),
    )


def downgrade() -> None:
    op.drop_table("prompt_feedback")
    op.drop_index("uq_prompt_experiments_active_label", table_name="prompt_experiments")
    op.drop_table("prompt_experiments")
    op.drop_index(op.f("ix_prompt_label_history_prompt_name_label"), table_name="prompt_label_history")
    op.drop_table("prompt_label_history")
    op.drop_table("prompt_labels")
    op.drop_table("prompt_versions")
    op.drop_table("prompts")
