"""JSON views of stored rows, shared by the HTTP API and the CLI (which must not import the API stack: a
``keel --help`` would then load the whole server)."""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module; the ORM loads only for the commands that need it
    from keel.prompts.models import PromptExperiment
    from keel.prompts.models import PromptVersion as VersionRow
    from keel.store.models import ScopeLimits, VirtualKey

__all__ = ["diff", "experiment_view", "iso", "key_view", "limits_view", "usd"]


def usd(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")


def key_view(k: VirtualKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "object": "key",
        "key_prefix": k.key_prefix,
        "name": k.name,
        "user_id": k.user_id,
        "team_id": k.team_id,
        "models": list(k.models or []),
        "rpm": k.rpm,
        "tpm": k.tpm,
        "max_parallel": k.max_parallel,
        "budget_usd": usd(k.budget_usd_micros),
        "budget_period": k.budget_period,
        "soft_budget_usd": usd(k.soft_budget_usd_micros),
        "expires_at": iso(k.expires_at),
        "revoked_at": iso(k.revoked_at),
        "metadata": k.metadata_ or {},
        "created_at": iso(k.created_at),
        "updated_at": iso(k.updated_at),
    }


def limits_view(row: ScopeLimits) -> dict[str, Any]:
    return {
        "object": "limits",
        "scope": row.scope,
        "id": row.scope_id,
        "budget_usd": usd(row.limit_usd_micros),
        "budget_period": row.period,
        "soft_budget_usd": usd(row.soft_limit_usd_micros),
        "rpm": row.rpm,
        "tpm": row.tpm,
        "max_parallel": row.max_parallel,
        "updated_at": iso(row.updated_at),
    }


def experiment_view(e: PromptExperiment) -> dict[str, Any]:
    return {
        "object": "prompt.experiment",
        "id": e.id,
        "name": e.prompt_name,
        "label": e.label,
        "control_version": e.control_version,
        "treatment_version": e.treatment_version,
        "percent": e.percent,
        "unit": e.unit,
        "shadow": e.shadow,
        "rollback_error_factor": e.rollback_error_factor,
        "rollback_min_requests": e.rollback_min_requests,
        "active": e.active,
        "created_by": e.created_by,
        "created_at": iso(e.created_at),
        "stopped_by": e.stopped_by,
        "stopped_at": iso(e.stopped_at),
        "stop_reason": e.stop_reason,
    }


def diff(old: VersionRow, new: VersionRow) -> str:
    """A unified diff of two versions' readable YAML (what ``keel prompts diff`` prints)."""
    from keel.prompts.repository import content_of

    return "".join(
        difflib.unified_diff(
            content_of(old).to_yaml().splitlines(keepends=True),
            content_of(new).to_yaml().splitlines(keepends=True),
            f"{old.prompt_name}@{old.version}",
            f"{new.prompt_name}@{new.version}",
        )
    )
