"""The check-only API: run an app's guardrails on a text without calling any model (benchmarks, moderation of
text from elsewhere, testing a config). Authenticates like every ``/v1`` route.

::

    POST /v1/guardrails/check
    {"text", "direction": "input" | "output", "app"?, "context"?, "system_prompt"?, "schema"?}
    → {"app", "direction", "allowed", "action": "block" | "redact" | "warn" | "allow",
       "reasons": [{"check", "reason", "detail", "score"?, "action"}], "text", "latency_ms", "checks": {name: ms}}

``text`` is the text with redactions applied (what a model would have seen); ``action`` is the strongest one any
finding caused. ``app`` may be left out when one app is configured. ``context``, ``system_prompt`` and ``schema``
stand for the retrieved context, the system messages and the output schema an answer is compared with.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from keel.api.guarded import app_guards
from keel.api.http import error_response, json_response
from keel.api.incoming import AsgiIncoming, Handler, Incoming
from keel.api.schemas import validate
from keel.api.state import AppState
from keel.context import RequestContext
from keel.errors import InvalidRequest, KeelError
from keel.guard.base import GuardInput

__all__ = ["HOT_ROUTES", "CheckIn", "router"]

router = APIRouter()


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    text: str
    direction: Literal["input", "output"]
    app: str | None = None
    context: str | None = None
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = Field(default=None, alias="schema")


def _app_name(state: AppState, name: str | None) -> str:
    if name is not None:
        return name
    apps = state.config.apps
    if len(apps) == 1:
        return apps[0].name
    if not apps:
        raise InvalidRequest("No apps are configured; add one under `apps:` in the config to check text against.")
    names = ", ".join(a.name for a in apps)
    raise InvalidRequest(f"Several apps are configured; name one in 'app' ({names}).", param="app")


@router.post(
    "/v1/guardrails/check",
    name="check",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CheckIn.model_json_schema(by_alias=True)}},
        }
    },
)
async def check_route(request: Request) -> Response:
    return await check(AsgiIncoming(request))


async def check(request: Incoming) -> Response:
    state = request.state
    try:
        principal = await state.auth.principal(request.header("authorization"))
        body = validate(CheckIn, await request.json())
        app = _app_name(state, body.app)
        guards = app_guards(state, app)
        runner = None if guards is None else (guards.input if body.direction == "input" else guards.output)
        inp = GuardInput(
            body.text,
            body.direction,
            app=app,
            context=body.context,
            system_prompt=body.system_prompt,
            schema=body.output_schema,
            embed=state.embedder.embed,
        )
        # Model calls a rail makes (NeMo) are billed to the caller: ledger rows and log lines of their own.
        inp.request = ctx = RequestContext(request_id=request.request_id, route="guardrails.check", principal=principal)
        try:
            verdict = None if runner is None else await runner.run(inp, request_id=ctx.request_id)
        finally:
            state.accounting.record(ctx)  # prices them too
            if state.accounting.charge is not None:  # no admission here: charged to the caller's budgets directly
                for call in ctx.side_calls:
                    await state.accounting.charge(call)
    except KeelError as exc:
        return error_response(exc)
    if verdict is None:
        result = {"allowed": True, "action": "allow", "reasons": [], "text": body.text, "latency_ms": 0.0, "checks": {}}
    else:
        result = {
            "allowed": verdict.allowed,
            "action": verdict.action,
            "reasons": verdict.reasons,
            "text": verdict.text,
            "latency_ms": round(verdict.latency_ms, 3),
            "checks": verdict.checks,
        }
    return json_response({"app": app, "direction": body.direction, **result})


HOT_ROUTES: dict[str, Handler] = {"/v1/guardrails/check": check}  # see keel.api.protocol
