"""Virtual keys, user and team limits, and the spend ledger.

Revision ID: 0001_keys_limits_spend
Revises:
Create Date: 2026-11-23

Generated with ``alembic revision --autogenerate`` and checked by hand. Types are spelled out here (no imports
from ``keel.store.models``) so this revision keeps meaning the same schema when the models move on;
``UTCDateTime`` is stored as ``DateTime(timezone=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_keys_limits_spend"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PERIODS = "('daily', 'weekly', 'monthly', 'none')"


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "virtual_keys",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("key_hash", sa.String(), nullable=False),
        sa.Column("key_prefix", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("team_id", sa.String(), nullable=True),
        sa.Column("models", _json(), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_parallel", sa.Integer(), nullable=True),
        sa.Column("budget_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("budget_period", sa.String(), nullable=False),
        sa.Column("soft_budget_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("metadata", _json(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=True),
        sa.Column("revoked_at", _timestamp(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.CheckConstraint(f"budget_period IN {_PERIODS}", name=op.f("ck_virtual_keys_budget_period_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_virtual_keys")),
    )
    op.create_index(op.f("ix_virtual_keys_key_hash"), "virtual_keys", ["key_hash"], unique=True)
    op.create_index(op.f("ix_virtual_keys_user_id"), "virtual_keys", ["user_id"])
    op.create_index(op.f("ix_virtual_keys_team_id"), "virtual_keys", ["team_id"])

    op.create_table(
        "scope_limits",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("scope_id", sa.String(), nullable=False),
        sa.Column("limit_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("period", sa.String(), nullable=False),
        sa.Column("soft_limit_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_parallel", sa.Integer(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.CheckConstraint(f"period IN {_PERIODS}", name=op.f("ck_scope_limits_period_valid")),
        sa.CheckConstraint("scope IN ('user', 'team')", name=op.f("ck_scope_limits_scope_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scope_limits")),
        sa.UniqueConstraint("scope", "scope_id", name=op.f("uq_scope_limits_scope_scope_id")),
    )

    op.create_table(
        "spend_records",
        # BIGINT on PostgreSQL; SQLite autoincrements only INTEGER PRIMARY KEY (its 64-bit rowid).
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("user_id", sa.String(), nullable=True),
        sa.Column("team_id", sa.String(), nullable=True),
        sa.Column("route", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("deployment", sa.String(), nullable=True),
        sa.Column("upstream_model", sa.String(), nullable=True),
        sa.Column("prompt_name", sa.String(), nullable=True),
        sa.Column("prompt_version", sa.Integer(), nullable=True),
        sa.Column("experiment_arm", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spend_records")),
    )
    op.create_index(op.f("ix_spend_records_request_id"), "spend_records", ["request_id"])
    op.create_index(op.f("ix_spend_records_created_at"), "spend_records", ["created_at"])
    op.create_index(op.f("ix_spend_records_key_id_created_at"), "spend_records", ["key_id", "created_at"])
    op.create_index(op.f("ix_spend_records_user_id_created_at"), "spend_records", ["user_id", "created_at"])
    op.create_index(op.f("ix_spend_records_team_id_created_at"), "spend_records", ["team_id", "created_at"])


def downgrade() -> None:
    op.drop_table("spend_records")
    op.drop_table("scope_limits")
    op.drop_table("virtual_keys")
