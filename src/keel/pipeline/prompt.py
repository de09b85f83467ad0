"""The prompt stage: an app's managed prompt, rendered in front of the conversation, and shadow experiments.

For a request whose ``ctx.app`` names a prompt, :class:`PromptStage` resolves it (version and experiment arm, see
:mod:`keel.prompts.service`), renders it with ``ctx.variables`` and puts the messages before the conversation in
``ctx.body``. The version's ``params`` fill in request fields the caller did not set, its ``output_schema`` becomes
``response_format`` (unless the caller set one), and its ``model`` replaces the requested one unless a budget
already downgraded the request (the version may not use a model the caller's key may not).

:class:`ShadowRunner` runs a shadow experiment's treatment: once the client has its whole answer, the same request
(the conversation as finally sent, with the treatment's messages in place of the control's) goes through the
router in the background. Its answer is never shown: it is logged on ``keel.prompts.shadow`` with the request
id (that logger carries model output; route or disable it separately), and its cost is recorded in the ledger
(``route="prompt.shadow"``, arm ``shadow``, no key or user: an experiment's cost is the operator's, not the
caller's budget).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from keel.context import RequestContext
from keel.errors import KeelError
from keel.llm.router import Router
from keel.pipeline.accounting import Accounting
from keel.pipeline.auth import check_model
from keel.prompts.service import ManagedSystemPrompt, PromptSnapshot, ResolvedPrompt

__all__ = ["PromptStage", "ShadowRunner", "request_options"]

log = logging.getLogger("keel.prompts")
shadow_log = logging.getLogger("keel.prompts.shadow")

_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]")


def request_options(prompt: PromptSnapshot) -> dict[str, Any]:
    """The request fields a version sets: its params, and its output schema as ``response_format``."""
    options = dict(prompt.content.params)
    schema = prompt.content.output_schema
    if schema is not None:
        name = _SCHEMA_NAME.sub("_", prompt.name)[:64]
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    return options


class PromptStage:
    name = "prompt"

    def __init__(self, managed: ManagedSystemPrompt) -> None:
        self.managed = managed

    async def __call__(self, ctx: RequestContext) -> None:
        app = ctx.app
        if app is None or app.prompt is None:
            return
        resolved, system = await self.managed.prepare(app, ctx, ctx.variables)
        assert resolved is not None
        body = {**request_options(resolved.prompt), **ctx.body}
        body["messages"] = [*system, *(ctx.body.get("messages") or [])]
        ctx.body = body
        model = resolved.model
        if model and model != ctx.public_model and "x-keel-downgraded" not in ctx.response_headers:
            if ctx.principal is not None:
                check_model(ctx.principal, model)
            ctx.public_model = model
            body["model"] = model


class ShadowRunner:
    """Implements :class:`~keel.prompts.service.ShadowScheduler`. At most ``max_in_flight`` shadow calls run at
    once; beyond that a shadow is skipped (and logged), since it must never slow the real traffic."""

    def __init__(self, router: Router, accounting: Accounting, max_in_flight: int = 32) -> None:
        self.router = router
        self.accounting = accounting
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(
        self,
        ctx: RequestContext,
        resolved: ResolvedPrompt,
        served: list[dict[str, str]],
        variables: Mapping[str, object],
    ) -> None:
        shadow = resolved.shadow
        assert shadow is not None
        try:
            messages = shadow.template.render(variables)
        except KeelError as exc:
            log.warning("shadow %s not run for request %s: %s", shadow.ref, ctx.request_id, exc.message)
            return

        def launch(done: RequestContext) -> None:
            self._launch(done, shadow, served, messages)

        ctx.defer(launch)

    async def drain(self) -> None:
        """Wait for the shadow calls in flight (tests, graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the shadow calls in flight: they are best effort, and shutdown should not wait on a model."""
        for task in self._tasks:
            task.cancel()
        await self.drain()

    def _launch(
        self, ctx: RequestContext, shadow: PromptSnapshot, served: list[dict[str, str]], messages: list[dict[str, str]]
    ) -> None:
        if ctx.deployment is None:
            return  # the request never reached a model: there is no traffic to copy
        conversation = list(ctx.body.get("messages") or [])
        start = _find(conversation, served)
        if start is None:
            log.warning(
                "shadow %s not run for request %s: the served prompt is not in the request", shadow.ref, ctx.request_id
            )
            return
        if len(self._tasks) >= self.max_in_flight:
            log.warning(
                "shadow %s skipped for request %s: %d shadows in flight", shadow.ref, ctx.request_id, len(self._tasks)
            )
            return
        conversation[start : start + len(served)] = messages
        body = {**ctx.body, **request_options(shadow), "messages": conversation, "stream": False}
        body.pop("stream_options", None)
        body["model"] = shadow.content.model or ctx.public_model
        sctx = RequestContext(
            request_id=f"{ctx.request_id}:shadow",
            route="prompt.shadow",
            body=body,
            public_model=body["model"],
            prompt_name=shadow.name,
            prompt_version=shadow.version,
            experiment_arm="shadow",
        )
        task = asyncio.get_running_loop().create_task(self._run(sctx, ctx.request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sctx: RequestContext, shadow_of: str) -> None:
        answer: str | None = None
        try:
            result = await self.router.complete(sctx, sctx.body)
        except KeelError as exc:
            sctx.fail(exc)
        else:
            usage = result.get("usage")
            sctx.usage = usage if isinstance(usage, dict) else None
            self.accounting.price(sctx)
            choices = result.get("choices") or [{}]
            answer = (choices[0].get("message") or {}).get("content")
        self.accounting.record(sctx)
        shadow_log.info(
            "shadow answer",
            extra={
                "fields": {
                    "request_id": shadow_of,
                    "shadow_request_id": sctx.request_id,
                    "prompt": f"{sctx.prompt_name}@{sctx.prompt_version}",
                    "model": sctx.public_model,
                    "deployment": sctx.deployment,
                    "outcome": sctx.outcome,
                    "latency_ms": round(sctx.elapsed_ms, 2),
                    "usage": sctx.usage,
                    "cost_usd": None if sctx.cost_micros is None else sctx.cost_micros / 1_000_000,
                    "error": sctx.error.message if sctx.error else None,
                    "answer": answer,
                }
            },
        )


def _find(messages: list[Any], run: list[dict[str, str]]) -> int | None:
    """Where the served prompt's messages start in the request as finally sent."""
    for i in range(len(messages) - len(run) + 1):
        if messages[i : i + len(run)] == run:
            return i
    return None
