"""Virtual keys: issue, look up, change and revoke the API keys Keel hands to its callers.

A secret looks like ``sk-keel-`` followed by 40 URL-safe characters (240 random bits). Only its SHA-256 is
stored (plus the first 12 characters, to tell keys apart in listings), so a leaked database holds no usable key;
:meth:`KeyRepository.create` returns the secret once and it cannot be recovered afterwards. A fast hash is enough
here: the secret is random, not a password, so there is nothing to brute-force.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select

from keel.errors import InvalidRequest
from keel.store.db import Database
from keel.store.models import VirtualKey, check_period, check_soft_limit, usd_to_micros, utcnow

__all__ = ["SECRET_PREFIX", "KeyRepository", "hash_secret"]

SECRET_PREFIX: Final = "sk-keel-"
PREFIX_CHARS: Final = 12

# What update() may change, by the names create() takes. Owner (user_id), hash and timestamps are not editable.
UPDATABLE: Final = frozenset(
    {
        "name",
        "team_id",
        "models",
        "rpm",
        "tpm",
        "max_parallel",
        "budget_usd",
        "budget_period",
        "soft_budget_usd",
        "expires_at",
        "metadata",
    }
)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest under which a key's secret is stored and looked up."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRepository:
    """Virtual keys in the database. Invalid field values raise :class:`~keel.errors.InvalidRequest`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        user_id: str,
        *,
        team_id: str | None = None,
        name: str | None = None,
        models: Iterable[str] = (),
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        budget_usd: float | None = None,
        budget_period: str = "none",
        soft_budget_usd: float | None = None,
        expires_at: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[VirtualKey, str]:
        """Issue a key for ``user_id``; returns the row and the plaintext secret, which is never shown again."""
        if not user_id:
            raise InvalidRequest("user_id is required", param="user_id")
        fields = _validated(
            {
                "name": name,
                "team_id": team_id,
                "models": models,
                "rpm": rpm,
                "tpm": tpm,
                "max_parallel": max_parallel,
                "budget_usd": budget_usd,
                "budget_period": budget_period,
                "soft_budget_usd": soft_budget_usd,
                "expires_at": expires_at,
                "metadata": metadata,
            }
        )
        check_soft_limit(fields["budget_usd_micros"], fields["soft_budget_usd_micros"], "soft_budget_usd")
        secret = SECRET_PREFIX + secrets.token_urlsafe(30)
        key = VirtualKey(user_id=user_id, key_hash=hash_secret(secret), key_prefix=secret[:PREFIX_CHARS], **fields)
        async with self._db.session() as session:
            session.add(key)
        return key, secret

    async def get(self, id: str) -> VirtualKey | None:
        async with self._db.session() as session:
            return await session.get(VirtualKey, id)

    async def get_by_secret(self, secret: str) -> VirtualKey | None:
        """The key whose secret this is, revoked and expired ones included (see :meth:`VirtualKey.is_active`)."""
        return await self.get_by_hash(hash_secret(secret))

    async def get_by_hash(self, key_hash: str) -> VirtualKey | None:
        """Like :meth:`get_by_secret`, for callers that already hashed the secret (to compare it elsewhere too)."""
        async with self._db.session() as session:
            key = await session.scalar(select(VirtualKey).where(VirtualKey.key_hash == key_hash))
        if key is None or not hmac.compare_digest(key.key_hash, key_hash):
            return None
        return key

    async def list(
        self,
        user_id: str | None = None,
        team_id: str | None = None,
        include_revoked: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[VirtualKey]:
        """Keys, newest first, optionally only one user's or team's."""
        stmt = select(VirtualKey)
        if user_id is not None:
            stmt = stmt.where(VirtualKey.user_id == user_id)
        if team_id is not None:
            stmt = stmt.where(VirtualKey.team_id == team_id)
        if not include_revoked:
            stmt = stmt.where(VirtualKey.revoked_at.is_(None))
        stmt = stmt.order_by(VirtualKey.created_at.desc(), VirtualKey.id.desc()).limit(limit).offset(offset)
        async with self._db.session() as session:
            return builtins.list(await session.scalars(stmt))

    async def update(self, id: str, **changes: Any) -> VirtualKey | None:
        """Change the fields named in :data:`UPDATABLE` (the names :meth:`create` takes); ``None`` if no such
        key. Unknown or read-only fields raise :class:`~keel.errors.InvalidRequest`."""
        for field in changes:
            if field not in UPDATABLE:
                allowed = ", ".join(sorted(UPDATABLE))
                raise InvalidRequest(f"key field {field!r} cannot be changed; changeable: {allowed}", param=field)
        fields = _validated(changes)
        async with self._db.session() as session:
            key = await session.get(VirtualKey, id, with_for_update=True)
            if key is None:
                return None
            for column, value in fields.items():
                setattr(key, column, value)
            check_soft_limit(key.budget_usd_micros, key.soft_budget_usd_micros, "soft_budget_usd")
        return key

    async def revoke(self, id: str) -> VirtualKey | None:
        """Revoke a key for good; revoking it again keeps the first ``revoked_at``. ``None`` if no such key."""
        async with self._db.session() as session:
            key = await session.get(VirtualKey, id, with_for_update=True)
            if key is not None and key.revoked_at is None:
                key.revoked_at = utcnow()
        return key


def _validated(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check values given by create()/update() names; return them by column attribute."""
    out: dict[str, Any] = {}
    for field, value in fields.items():
        if field in ("budget_usd", "soft_budget_usd"):
            out[f"{field}_micros"] = usd_to_micros(value, field)
        elif field in ("rpm", "tpm", "max_parallel"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"{field} must be a positive integer or null, got {value!r}", param=field)
            out[field] = value
        elif field == "budget_period":
            out[field] = check_period(value, field)
        elif field == "models":
            names = None if isinstance(value, str) else builtins.list(value or ())
            if names is None or not all(isinstance(n, str) and n for n in names):
                raise InvalidRequest("models must be a list of model names", param=field)
            out[field] = names
        elif field == "metadata":
            out["metadata_"] = dict(value or {})
        elif field == "expires_at":
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise InvalidRequest("expires_at must be a timezone-aware datetime or null", param=field)
            out[field] = value
        else:  # name, team_id
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequest(f"{field} must be a non-empty string or null", param=field)
            out[field] = value
    return out
