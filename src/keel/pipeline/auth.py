"""Authentication: who is calling, and what they may use.

With a master key configured, every ``/v1`` call must carry ``Authorization: Bearer <key>``: the master key (an
administrator, unlimited) or a virtual key (a :class:`Principal` with its owner, team, allowed models, limits and
budget). Keys are looked up by their sha256 hash; lookups are cached for ``auth.key_cache_ttl_s`` (so a revoked key
stops working on every worker within that time) and unknown keys are cached too, so a client hammering with a bad
key cannot hammer the database.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from keel.context import RequestContext
from keel.errors import AuthError, PermissionDenied
from keel.store.keys import KeyRepository, hash_secret
from keel.store.limits import ScopeLimitsRepository
from keel.store.models import ScopeLimits, VirtualKey

__all__ = ["Authenticator", "Principal", "ScopeSettings"]


@dataclass(frozen=True, slots=True)
class ScopeSettings:
    """Limits and budget of one scope (a key, a user or a team). ``None`` = no limit of that kind."""

    scope: Literal["key", "user", "team"]
    id: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_micros: int | None = None
    soft_budget_micros: int | None = None
    period: str = "none"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["anonymous", "master", "key"]
    key_id: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    models: tuple[str, ...] = ()
    scopes: tuple[ScopeSettings, ...] = field(default=())

    @property
    def unlimited(self) -> bool:
        return self.kind != "key"


ANONYMOUS = Principal("anonymous")
MASTER = Principal("master")


def _from_key(key: VirtualKey, user: ScopeLimits | None, team: ScopeLimits | None) -> Principal:
    scopes = [
        ScopeSettings(
            "key",
            key.id,
            key.rpm,
            key.tpm,
            key.max_parallel,
            key.budget_usd_micros,
            key.soft_budget_usd_micros,
            key.budget_period,
        )
    ]
    pairs: tuple[tuple[Literal["user", "team"], ScopeLimits | None], ...] = (("user", user), ("team", team))
    for scope, row in pairs:
        if row is not None:
            scopes.append(
                ScopeSettings(
                    scope,
                    row.scope_id,
                    row.rpm,
                    row.tpm,
                    row.max_parallel,
                    row.limit_usd_micros,
                    row.soft_limit_usd_micros,
                    row.period,
                )
            )
    return Principal("key", key.id, key.user_id, key.team_id, tuple(key.models or ()), tuple(scopes))


class Authenticator:
    def __init__(
        self,
        master_key: str | None,
        keys: KeyRepository,
        limits: ScopeLimitsRepository,
        cache_ttl_s: float = 5.0,
        max_cached: int = 10_000,
    ) -> None:
        self.master_key = master_key
        self._master_hash = hash_secret(master_key) if master_key else None
        self._keys = keys
        self._limits = limits
        self._ttl = cache_ttl_s
        self._max = max_cached
        self._cache: OrderedDict[str, tuple[float, Principal | None, datetime | None]] = OrderedDict()

    @property
    def required(self) -> bool:
        return self.master_key is not None

    def invalidate(self) -> None:
        """Forget cached lookups (after this worker changed a key)."""
        self._cache.clear()

    async def principal(self, authorization: str | None) -> Principal:
        if self._master_hash is None:
            return ANONYMOUS
        secret = _bearer(authorization)
        digest = hash_secret(secret)
        if hmac.compare_digest(digest, self._master_hash):
            return MASTER
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(digest)
            found, expires_at = hit[1], hit[2]
        else:
            found, expires_at = await self._lookup(digest)
            self._cache[digest] = (now + self._ttl, found, expires_at)
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if found is None:
            raise AuthError("Invalid API key. Check the key, or create one with `keel keys create`.")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise AuthError("This API key has expired. Ask an administrator for a new one.", code="expired_api_key")
        return found

    async def _lookup(self, digest: str) -> tuple[Principal | None, datetime | None]:
        key = await self._keys.get_by_hash(digest)
        if key is None or key.revoked_at is not None:
            return None, None
        user = await self._limits.get("user", key.user_id)
        team = await self._limits.get("team", key.team_id) if key.team_id else None
        return _from_key(key, user, team), key.expires_at


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(
            "Missing API key. Send it as 'Authorization: Bearer <key>' (OpenAI SDKs: api_key=...).",
            code="missing_api_key",
        )
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthError("Malformed Authorization header; expected 'Bearer <key>'.")
    return secret.strip()


class AuthStage:
    """Pipeline stage: resolve ``ctx.principal`` (routes usually have already, before reading the body, so an
    unauthenticated caller learns nothing about validation) and check the requested model is allowed for it."""

    name = "auth"

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None:
            principal = ctx.principal = await self.auth.principal(ctx.authorization)
        check_model(principal, ctx.public_model)


def check_model(principal: Principal, model: str | None) -> None:
    if principal.models and model is not None and model not in principal.models:
        raise PermissionDenied(
            f"This key may not use model {model!r}; allowed: {', '.join(principal.models)}.",
            param="model",
            code="model_not_allowed",
        )
