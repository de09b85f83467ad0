"""Prompt management over HTTP (master key, like the other admin routes), and feedback on answers.

::

    POST /v1/admin/prompts/{name}/versions                 a new version (200 with "created": false if unchanged)
    GET  /v1/admin/prompts                                 every prompt, its latest version and labels
    GET  /v1/admin/prompts/{name}                          versions, labels, label history, experiments
    GET  /v1/admin/prompts/{name}/versions/{version}       one version ("latest" works)
    GET  /v1/admin/prompts/{name}/diff?from=V1&to=V2       unified diff of two versions
    POST /v1/admin/prompts/{name}/render                   render a label or version with variables (a dry run)
    PUT  /v1/admin/prompts/{name}/labels/{label}           point a label at a version: {"version": 3 | "latest"}
    POST /v1/admin/prompts/{name}/labels/{label}/rollback  back to the version it pointed at before
    POST /v1/admin/prompts/{name}/experiments              start an experiment on a label
    GET  /v1/admin/prompts/{name}/experiments              experiments, newest first
    POST /v1/admin/prompts/{name}/experiments/{id}/stop    stop it (optionally promoting the treatment)
    GET  /v1/admin/prompts/{name}/stats?versions=1,2&since=ISO   per-version figures, to compare versions
    POST /v1/feedback                                      {"request_id", "score": 1 | -1, "comment"?}

Changes are attributed to the ``X-Keel-Actor`` header when given (``api`` otherwise). ``/v1/feedback`` is open to
any authenticated caller; a virtual key may only rate its own requests.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from keel.api.admin import _admin, _caller, _date_param
from keel.api.http import error_response, json_response, read_json
from keel.api.schemas import validate
from keel.api.state import AppState
from keel.errors import InvalidRequest, KeelError, NotFound
from keel.prompts.models import PromptFeedback, PromptLabelMove
from keel.prompts.models import PromptVersion as VersionRow
from keel.prompts.repository import content_of
from keel.prompts.spec import PromptContent
from keel.store.models import SpendRecord
from keel.views import diff, experiment_view, iso

__all__ = ["diff", "experiment_view", "move_view", "router", "version_view"]

router = APIRouter()

VersionRef = int | Literal["latest"]
_POLL_S = 0.1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionCreate(PromptContent):
    message: str | None = Field(default=None, max_length=2000)


class LabelSet(_Body):
    version: VersionRef
    reason: str | None = Field(default=None, max_length=2000)


class Reason(_Body):
    reason: str | None = Field(default=None, max_length=2000)


class ExperimentCreate(_Body):
    label: str = "production"
    treatment_version: VersionRef
    percent: float = Field(gt=0, le=100)
    unit: Literal["user", "session"] = "user"
    shadow: bool = False
    rollback_error_factor: float | None = Field(default=2.0, gt=1)
    rollback_min_requests: int = Field(default=100, ge=1)


class ExperimentStop(Reason):
    promote: bool = False


class RenderBody(_Body):
    label: str | None = None
    version: VersionRef | None = None
    variables: dict[str, Any] = Field(default_factory=dict)


class FeedbackBody(_Body):
    request_id: str = Field(min_length=1, max_length=200)
    score: Literal[1, -1]
    comment: str | None = Field(default=None, max_length=2000)


def version_view(row: VersionRow) -> dict[str, Any]:
    return {
        "object": "prompt.version",
        "name": row.prompt_name,
        "version": row.version,
        **content_of(row).canonical(),
        "content_hash": row.content_hash,
        "message": row.message,
        "created_by": row.created_by,
        "created_at": iso(row.created_at),
    }


def move_view(move: PromptLabelMove) -> dict[str, Any]:
    return {
        "object": "prompt.label_move",
        "name": move.prompt_name,
        "label": move.label,
        "from_version": move.from_version,
        "to_version": move.to_version,
        "action": move.action,
        "changed_by": move.changed_by,
        "changed_at": iso(move.changed_at),
        "reason": move.reason,
    }


def _feedback_view(f: PromptFeedback, ledger: SpendRecord) -> dict[str, Any]:
    return {
        "object": "feedback",
        "request_id": f.request_id,
        "score": f.score,
        "comment": f.comment,
        "prompt_name": ledger.prompt_name,
        "prompt_version": ledger.prompt_version,
        "experiment_arm": ledger.experiment_arm,
        "created_at": iso(f.created_at),
    }


def _actor(request: Request) -> str:
    return request.headers.get("x-keel-actor", "").strip()[:200] or "api"


async def _body(request: Request, state: AppState) -> Any:
    """The JSON body, or ``{}`` when there is none (for the routes whose every field is optional)."""
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return {}
    return await read_json(request, state.config.server.max_body_bytes)


def _version_param(raw: str, name: str) -> VersionRef:
    if raw == "latest":
        return "latest"
    if not raw.isdigit():
        raise InvalidRequest(f"{name} must be a version number or 'latest'", param=name)
    return int(raw)


@router.post("/v1/admin/prompts/{name}/versions", status_code=201)
async def create_version(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(VersionCreate, await read_json(request, state.config.server.max_body_bytes))
        content = PromptContent.model_validate(body.model_dump(exclude={"message"}))
        row, created = await state.prompts.push(name, content, by=_actor(request), message=body.message)
    except KeelError as exc:
        return error_response(exc)
    return json_response({**version_view(row), "created": created}, 201 if created else 200)


@router.get("/v1/admin/prompts")
async def list_prompts(request: Request) -> Response:
    try:
        state = await _admin(request)
        rows = await state.prompts.repo.list()
    except KeelError as exc:
        return error_response(exc)
    data = [
        {
            "object": "prompt",
            "name": p.name,
            "latest_version": p.latest_version,
            "labels": labels,
            "created_at": iso(p.created_at),
            "updated_at": iso(p.updated_at),
        }
        for p, labels in rows
    ]
    return json_response({"object": "list", "data": data})


@router.get("/v1/admin/prompts/{name}")
async def show_prompt(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        repo = state.prompts.repo
        versions = await repo.versions(name)
        labels = await repo.labels(name)
        history = await repo.history(name)
        experiments = await repo.experiments(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response(
        {
            "object": "prompt",
            "name": name,
            "latest_version": versions[-1].version,
            "labels": {
                lb.label: {"version": lb.version, "updated_by": lb.updated_by, "updated_at": iso(lb.updated_at)}
                for lb in labels
            },
            "versions": [version_view(v) for v in versions],
            "label_history": [move_view(m) for m in history],
            "experiments": [experiment_view(e) for e in experiments],
        }
    )


@router.get("/v1/admin/prompts/{name}/versions/{version}")
async def get_version(request: Request, name: str, version: str) -> Response:
    try:
        state = await _admin(request)
        row = await state.prompts.repo.get_version(name, _version_param(version, "version"))
    except KeelError as exc:
        return error_response(exc)
    return json_response(version_view(row))


@router.get("/v1/admin/prompts/{name}/diff")
async def diff_versions(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        q = request.query_params
        if "from" not in q or "to" not in q:
            raise InvalidRequest("give both versions: ?from=V1&to=V2", param="from")
        repo = state.prompts.repo
        old = await repo.get_version(name, _version_param(q["from"], "from"))
        new = await repo.get_version(name, _version_param(q["to"], "to"))
    except KeelError as exc:
        return error_response(exc)
    view = {"object": "prompt.diff", "name": name, "from": old.version, "to": new.version, "diff": diff(old, new)}
    return json_response(view)


@router.post("/v1/admin/prompts/{name}/render")
async def render(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(RenderBody, await _body(request, state))
        service = state.prompts
        if body.version is not None:
            snapshot = await service.version(name, body.version)
        else:
            snapshot = (await service.resolve(name, body.label or "production")).prompt
        messages = snapshot.template.render(body.variables)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "prompt.rendered", "prompt": snapshot.ref, "messages": messages})


@router.put("/v1/admin/prompts/{name}/labels/{label}")
async def set_label(request: Request, name: str, label: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(LabelSet, await read_json(request, state.config.server.max_body_bytes))
        service = state.prompts
        move = await service.repo.set_label(name, label, body.version, by=_actor(request), reason=body.reason)
        service.invalidate(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response(_label_result(name, label, move))


@router.post("/v1/admin/prompts/{name}/labels/{label}/rollback")
async def rollback(request: Request, name: str, label: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(Reason, await _body(request, state))
        service = state.prompts
        move = await service.repo.rollback(name, label, by=_actor(request), reason=body.reason)
        service.invalidate(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response(_label_result(name, label, move))


def _label_result(name: str, label: str, move: PromptLabelMove | None) -> dict[str, Any]:
    """The move made, or ``"changed": false`` when the label already pointed there."""
    if move is None:
        return {"object": "prompt.label_move", "name": name, "label": label, "changed": False}
    return {**move_view(move), "changed": True}


@router.post("/v1/admin/prompts/{name}/experiments", status_code=201)
async def start_experiment(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(ExperimentCreate, await read_json(request, state.config.server.max_body_bytes))
        service = state.prompts
        experiment = await service.repo.start_experiment(
            name,
            body.label,
            body.treatment_version,
            body.percent,
            by=_actor(request),
            unit=body.unit,
            shadow=body.shadow,
            rollback_error_factor=body.rollback_error_factor,
            rollback_min_requests=body.rollback_min_requests,
        )
        service.invalidate(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response(experiment_view(experiment), 201)


@router.get("/v1/admin/prompts/{name}/experiments")
async def list_experiments(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        rows = await state.prompts.repo.experiments(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "list", "data": [experiment_view(e) for e in rows]})


@router.post("/v1/admin/prompts/{name}/experiments/{experiment_id}/stop")
async def stop_experiment(request: Request, name: str, experiment_id: str) -> Response:
    try:
        state = await _admin(request)
        body = validate(ExperimentStop, await _body(request, state))
        service = state.prompts
        running = [e for e in await service.repo.experiments(name) if e.id == experiment_id]
        if not running:
            raise NotFound(f"Prompt {name!r} has no experiment {experiment_id!r}.", code="experiment_not_found")
        stopped = await service.repo.stop_experiment(
            experiment_id, by=_actor(request), reason=body.reason, promote=body.promote
        )
        service.invalidate(name)
    except KeelError as exc:
        return error_response(exc)
    return json_response({**experiment_view(stopped or running[0]), "changed": stopped is not None})


@router.get("/v1/admin/prompts/{name}/stats")
async def stats(request: Request, name: str) -> Response:
    try:
        state = await _admin(request)
        q = request.query_params
        versions = None
        if q.get("versions"):
            parts = [v.strip() for v in q["versions"].split(",")]
            if not all(p.isdigit() for p in parts):
                raise InvalidRequest("versions must be comma-separated version numbers", param="versions")
            versions = [int(p) for p in parts]
        since = _date_param(q.get("since"), "since")
        await state.ledger.flush()
        rows = await state.prompts.stats(name, versions, since)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "list", "name": name, "data": [r.as_dict() for r in rows]})


@router.post("/v1/feedback", status_code=201)
async def feedback(request: Request) -> Response:
    """Thumbs up or down on an answer, by its request id (the ``x-request-id`` response header)."""
    try:
        state: AppState = request.app.state.keel
        principal = await _caller(request, state)
        body = validate(FeedbackBody, await read_json(request, state.config.server.max_body_bytes))
        ledger = await _ledger_row(state, body.request_id)
        if ledger is None or (principal.kind == "key" and ledger.key_id != principal.key_id):
            # The same answer for someone else's request as for none: ids are not an oracle.
            raise NotFound(f"No request with id {body.request_id!r} to rate.", code="request_not_found")
        row = await state.prompts.repo.add_feedback(
            body.request_id, body.score, body.comment, key_id=principal.key_id, user_id=principal.user_id
        )
    except KeelError as exc:
        return error_response(exc)
    return json_response(_feedback_view(row, ledger), 201)


async def _ledger_row(state: AppState, request_id: str) -> SpendRecord | None:
    """The request's ledger row. Another worker may still hold it in its write batch, so a miss is retried for
    two flush intervals before it counts as unknown."""
    await state.ledger.flush()
    repo = state.prompts.repo
    for _ in range(int(2 * state.config.accounting.flush_interval_s / _POLL_S)):
        row = await repo.request_owner(request_id)
        if row is not None:
            return row
        await asyncio.sleep(_POLL_S)
    return await repo.request_owner(request_id)
