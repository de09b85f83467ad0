"""Administration over HTTP: virtual keys, user and team limits, emergency mode, and usage reports.

Admin routes need the master key when one is configured. Without one Keel is in open mode, which ``keel serve``
only allows on loopback addresses, so these routes are reachable only from the machine itself. ``/v1/usage`` is
also open to virtual keys, which see their own usage and nobody else's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from keel.api.http import error_response, json_response, read_json
from keel.api.schemas import validate
from keel.api.state import AppState
from keel.errors import InvalidRequest, KeelError, NotFound, PermissionDenied
from keel.pipeline.auth import Principal
from keel.views import key_view, limits_view, usd

__all__ = ["router"]

router = APIRouter()

Period = Literal["daily", "weekly", "monthly", "none"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyFields(_Body):
    name: str | None = Field(default=None, max_length=200)
    team_id: str | None = Field(default=None, min_length=1, max_length=200)
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)
    budget_usd: float | None = Field(default=None, ge=0)
    budget_period: Period | None = None
    soft_budget_usd: float | None = Field(default=None, ge=0)
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class KeyCreate(KeyFields):
    user_id: str = Field(min_length=1, max_length=200)


class LimitsBody(_Body):
    budget_usd: float | None = Field(default=None, ge=0)
    budget_period: Period = "none"
    soft_budget_usd: float | None = Field(default=None, ge=0)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)


def _key_changes(body: KeyFields) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in body.model_fields_set:
        value = getattr(body, name)
        if name == "metadata":
            value = value or {}
        elif name == "models":
            value = value or []
        elif name == "budget_period":
            value = value or "none"
        changes[name] = value
    return changes


async def _caller(request: Request, state: AppState) -> Principal:
    return await state.auth.principal(request.headers.get("authorization"))


async def _admin(request: Request) -> AppState:
    state: AppState = request.app.state.keel
    principal = await _caller(request, state)
    if principal.kind == "key":
        raise PermissionDenied("This route needs the master key; virtual keys cannot administer Keel.")
    return state


@router.post("/v1/admin/keys", status_code=201)
async def create_key(request: Request) -> Response:
    try:
        state = await _admin(request)
        body = validate(KeyCreate, await read_json(request, state.config.server.max_body_bytes))
        changes = _key_changes(body)
        changes.pop("user_id", None)
        key, secret = await state.keys.create(body.user_id, **changes)
    except KeelError as exc:
        return error_response(exc)
    state.auth.invalidate()
    return json_response({**key_view(key), "key": secret}, 201)


@router.get("/v1/admin/keys")
async def list_keys(request: Request) -> Response:
    try:
        state = await _admin(request)
        q = request.query_params
        limit, offset = _int_param(q.get("limit"), "limit", 100), _int_param(q.get("offset"), "offset", 0)
        rows = await state.keys.list(
            user_id=q.get("user_id"),
            team_id=q.get("team_id"),
            include_revoked=q.get("include_revoked") in ("1", "true"),
            limit=min(limit, 1000),
            offset=offset,
        )
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "list", "data": [key_view(k) for k in rows]})


@router.get("/v1/admin/keys/{key_id}")
async def get_key(request: Request, key_id: str) -> Response:
    try:
        state = await _admin(request)
        key = await state.keys.get(key_id)
        if key is None:
            raise _no_key(key_id)
    except KeelError as exc:
        return error_response(exc)
    return json_response(key_view(key))


@router.patch("/v1/admin/keys/{key_id}")
async def update_key(request: Request, key_id: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(KeyFields, await read_json(request, state.config.server.max_body_bytes))
        key = await state.keys.update(key_id, **_key_changes(body))
        if key is None:
            raise _no_key(key_id)
    except KeelError as exc:
        return error_response(exc)
    state.auth.invalidate()
    return json_response(key_view(key))


@router.delete("/v1/admin/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> Response:
    try:
        state = await _admin(request)
        key = await state.keys.revoke(key_id)
        if key is None:
            raise _no_key(key_id)
    except KeelError as exc:
        return error_response(exc)
    state.auth.invalidate()
    return json_response({**key_view(key), "revoked": True})


@router.put("/v1/admin/limits/{scope}/{scope_id}")
async def put_limits(request: Request, scope: str, scope_id: str) -> Response:
    try:
        state = await _admin(request)
        _check_scope(scope)
        body = validate(LimitsBody, await read_json(request, state.config.server.max_body_bytes))
        row = await state.limits.upsert(
            scope,
            scope_id,
            limit_usd=body.budget_usd,
            period=body.budget_period,
            soft_limit_usd=body.soft_budget_usd,
            rpm=body.rpm,
            tpm=body.tpm,
            max_parallel=body.max_parallel,
        )
    except KeelError as exc:
        return error_response(exc)
    state.auth.invalidate()
    return json_response(limits_view(row))


@router.get("/v1/admin/limits")
async def list_limits(request: Request) -> Response:
    try:
        state = await _admin(request)
        scope = request.query_params.get("scope")
        if scope is not None:
            _check_scope(scope)
        rows = await state.limits.list(scope)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "list", "data": [limits_view(r) for r in rows]})


@router.delete("/v1/admin/limits/{scope}/{scope_id}")
async def delete_limits(request: Request, scope: str, scope_id: str) -> Response:
    try:
        state = await _admin(request)
        _check_scope(scope)
        deleted = await state.limits.delete(scope, scope_id)
    except KeelError as exc:
        return error_response(exc)
    state.auth.invalidate()
    return json_response({"scope": scope, "id": scope_id, "deleted": deleted})


@router.get("/v1/admin/emergency")
async def emergency_status(request: Request) -> Response:
    try:
        state = await _admin(request)
        status = await state.emergency.status(fresh=True)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"active": status is not None, **(status or {})})


@router.delete("/v1/admin/emergency")
async def lift_emergency(request: Request) -> Response:
    try:
        state = await _admin(request)
        await state.emergency.lift()
    except KeelError as exc:
        return error_response(exc)
    return json_response({"active": False, "lifted": True})


_GROUPS = ("key", "user", "team", "model", "day")


@router.get("/v1/usage")
async def usage(request: Request) -> Response:
    """Spend and tokens per group. The master key sees everything; a virtual key only its own requests."""
    try:
        state: AppState = request.app.state.keel
        principal = await _caller(request, state)
        q = request.query_params
        group_by = q.get("group_by", "model")
        if group_by not in _GROUPS:
            raise InvalidRequest(f"group_by must be one of {', '.join(_GROUPS)}", param="group_by")
        since, until = _date_param(q.get("since"), "since"), _date_param(q.get("until"), "until")
        filters: dict[str, str | None] = {
            "user_id": q.get("user_id"),
            "team_id": q.get("team_id"),
            "key_id": q.get("key_id"),
        }
        if principal.kind == "key":
            filters = {"user_id": None, "team_id": None, "key_id": principal.key_id}
        await state.ledger.flush()
        rows = await state.spend.report(group_by, since, until, **filters)  # type: ignore[arg-type]
    except KeelError as exc:
        return error_response(exc)
    data = [
        {
            "group": r["group"],
            "requests": r["requests"],
            "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"],
            "cost_usd": usd(r["cost_usd_micros"]) or 0.0,
            "unpriced_requests": r["unpriced_requests"],
        }
        for r in rows
    ]
    return json_response({"object": "list", "group_by": group_by, "data": data})


def _check_scope(scope: str) -> None:
    if scope not in ("user", "team"):
        raise InvalidRequest("scope must be 'user' or 'team' (key limits are set on the key)", param="scope")


def _no_key(key_id: str) -> KeelError:
    return NotFound(f"No key with id {key_id!r}.", code="key_not_found")


def _int_param(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer", param=name)
    return int(raw)


def _date_param(raw: str | None, name: str) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 date or time, e.g. 2026-11-01", param=name) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
