"""Guardrails in the chat routes: the new user message before any model call, the answer before it is returned
(or, on a stream, as it goes out), with their cost in ``ctx.timings`` and the ``x-keel-guardrails-ms`` header.

Used by the session route (:mod:`keel.api.sessions`) and by ``/v1/chat/completions`` when a request names an app
with ``x-keel-app``. Routes without guardrails never get here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keel.api.context import price_result
from keel.api.state import AppState
from keel.config import KeelConfig
from keel.context import RequestContext
from keel.errors import GuardrailBlocked, NotFound
from keel.guard.base import GuardInput, Span
from keel.guard.registry import AppGuards, Embed
from keel.guard.runner import Verdict, redact
from keel.guard.stream import StreamGuard, guard_stream
from keel.llm.router import PrimedStream
from keel.llm.tokens import message_text

__all__ = [
    "HEADER",
    "OutputScope",
    "app_guards",
    "check_completion",
    "check_input",
    "check_messages",
    "guard_answer",
    "guard_answer_stream",
    "request_scope",
]

HEADER: Final = "x-keel-guardrails-ms"
_REPAIR = (
    "Your previous answer does not match the required JSON schema: {errors}. Answer again with only the JSON "
    "document, valid against the schema, and nothing else."
)


@dataclass(frozen=True, slots=True)
class OutputScope:
    """What output checks compare an answer with: the system messages sent upstream, the retrieved context they
    carry (quoting it is fine), and the JSON schema the answer must satisfy, if any."""

    system_prompt: str | None = None
    context: str | None = None
    schema: Mapping[str, Any] | None = None


def _record(ctx: RequestContext, direction: str, verdict: Verdict) -> None:
    timings = ctx.timings
    key = f"guardrails.{direction}"
    timings[key] = timings.get(key, 0.0) + verdict.latency_ms
    for name, ms in verdict.checks.items():
        timings[f"{key}.{name}"] = timings.get(f"{key}.{name}", 0.0) + ms
    total = timings.get("guardrails.input", 0.0) + timings.get("guardrails.output", 0.0)
    ctx.response_headers[HEADER] = f"{total:.2f}"


async def check_input(guards: AppGuards, ctx: RequestContext, text: str, embed: Embed | None) -> Verdict:
    """Run the app's input checks on a user message; raises :class:`GuardrailBlocked` (the app's refusal and the
    reasons) when blocked. The verdict's ``text`` is what the model may see."""
    assert guards.input is not None
    inp = GuardInput(text, "input", app=guards.app, embed=embed, request=ctx)
    verdict = await guards.input.run(inp, request_id=ctx.request_id)
    _record(ctx, "input", verdict)
    if not verdict.allowed:
        raise GuardrailBlocked(guards.refusal, reasons=verdict.blocking)
    return verdict


def _redact_parts(parts: list[Any], spans: Sequence[Span]) -> list[Any]:
    """Text parts redacted with spans measured on :func:`~keel.llm.tokens.message_text` (parts joined by "\\n")."""
    out: list[Any] = []
    at = 0
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            out.append(part)
            continue
        text = str(part.get("text", ""))
        end = at + len(text)
        mine = [
            Span(max(s.start, at) - at, min(s.end, end) - at, s.entity) for s in spans if s.start < end and s.end > at
        ]
        out.append({**part, "text": redact(text, mine)})
        at = end + 1
    return out


async def check_messages(guards: AppGuards, ctx: RequestContext, embed: Embed | None) -> None:
    """Input checks on the last user message of ``ctx.body`` (an OpenAI request: earlier messages were checked
    when they were new); a redaction is written back into the body that goes upstream."""
    messages = ctx.body.get("messages")
    if not isinstance(messages, list):
        return
    index = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if index is None:
        return
    content = messages[index].get("content")
    verdict = await check_input(guards, ctx, message_text(content), embed)
    if verdict.spans:
        new = verdict.text if isinstance(content, str) else _redact_parts(content, verdict.spans)
        messages = list(messages)
        messages[index] = {**messages[index], "content": new}
        ctx.body = {**ctx.body, "messages": messages}


async def _check_answer(
    guards: AppGuards, ctx: RequestContext, text: str, scope: OutputScope, embed: Embed | None
) -> Verdict:
    assert guards.output is not None
    inp = GuardInput(
        text, "output", app=guards.app, context=scope.context, system_prompt=scope.system_prompt, schema=scope.schema
    )
    inp.embed, inp.request = embed, ctx
    verdict = await guards.output.run(inp, request_id=ctx.request_id)
    _record(ctx, "output", verdict)
    return verdict


def _json_only(verdict: Verdict) -> bool:
    """Blocked only by the JSON schema check: what one repair retry may fix."""
    return all(r["check"].split("#")[0] == "json_schema" for r in verdict.blocking)


def _sum_usage(a: Any, b: Any) -> Any:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return b
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {**b, **{k: a.get(k, 0) + b.get(k, 0) for k in keys if isinstance(b.get(k), int)}}


async def check_completion(
    guards: AppGuards,
    ctx: RequestContext,
    result: dict[str, Any],
    scope: OutputScope,
    embed: Embed | None,
    *,
    repair: Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]] | None,
    price: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Output checks on each choice of a complete answer, redactions written back. When the answer is blocked
    only by ``json_schema``, ``repair`` asks the model once more with the validation error; the usage of both calls
    is summed. ``price`` prices the final result, also when the answer is refused (the model was paid)."""
    verdict: Verdict | None = None
    for attempt in (1, 2):
        for choice in result.get("choices") or []:
            message = choice.get("message") or {}
            content = message.get("content")
            if not isinstance(content, str):
                continue
            verdict = await _check_answer(guards, ctx, content, scope, embed)
            if not verdict.allowed:
                break
            if verdict.spans:
                choice["message"] = {**message, "content": verdict.text}
        else:
            price(result)
            return result
        assert verdict is not None
        if attempt == 2 or repair is None or not _json_only(verdict) or len(result.get("choices") or []) != 1:
            break
        errors = "; ".join(r["detail"] for r in verdict.blocking)
        answer = {"role": "assistant", "content": verdict.text}
        again = await repair([answer, {"role": "user", "content": _REPAIR.format(errors=errors)}])
        again["usage"] = _sum_usage(result.get("usage"), again.get("usage"))
        result = again
    price(result)
    assert verdict is not None
    raise GuardrailBlocked(guards.refusal, reasons=verdict.blocking)


async def guard_answer_stream(
    guards: AppGuards, ctx: RequestContext, stream: PrimedStream, scope: OutputScope, embed: Embed | None
) -> PrimedStream:
    """The stream with the output checks on a sliding window (:mod:`keel.guard.stream`)."""
    assert guards.output is not None
    runner = guards.output
    template = GuardInput(
        "", "output", app=guards.app, context=scope.context, system_prompt=scope.system_prompt, schema=scope.schema
    )
    template.embed, template.request = embed, ctx

    def new_guard() -> StreamGuard:
        return StreamGuard(
            runner,
            template,
            guards.window_chars,
            guards.refusal,
            on_verdict=lambda v: _record(ctx, "output", v),
            request_id=ctx.request_id,
        )

    return await guard_stream(stream, new_guard)


async def guard_answer(
    state: AppState, guards: AppGuards, ctx: RequestContext, result: dict[str, Any] | PrimedStream, scope: OutputScope
) -> dict[str, Any] | PrimedStream:
    """Output checks on what ``state.pipeline.chat`` returned: a complete answer (priced here, with one repair
    retry for JSON that misses its schema) or a stream, checked as it goes out."""
    embed = state.embedder.embed
    if not isinstance(result, dict):
        return await guard_answer_stream(guards, ctx, result, scope, embed)

    async def repair(extra: list[dict[str, Any]]) -> dict[str, Any]:
        body = {**ctx.body, "messages": [*ctx.body["messages"], *extra]}
        return await state.router.complete(ctx, body)

    return await check_completion(
        guards, ctx, result, scope, embed, repair=repair, price=lambda r: price_result(ctx, r, state)
    )


def app_guards(state: AppState, name: str) -> AppGuards | None:
    """The guardrails of the app named by ``x-keel-app`` (None when it has none); 404 for an unknown app."""
    guards = state.guards.get(name)
    if guards is None and state.config.app(name) is None:
        raise _unknown_app(state.config, name)
    return guards


def _unknown_app(config: KeelConfig, name: str) -> NotFound:
    names = ", ".join(a.name for a in config.apps) or "none"
    return NotFound(f"No app {name!r}; configured: {names}.", param="app", code="app_not_found")


def request_scope(body: Mapping[str, Any]) -> OutputScope:
    """The scope of a pass-through request: its system (and developer) messages, and the JSON schema of its
    ``response_format``. It carries no separate retrieved context."""
    messages = body.get("messages") or []
    system = "\n\n".join(message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    response_format = body.get("response_format")
    schema = None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) and isinstance(spec.get("schema"), dict) else None
    return OutputScope(system or None, None, schema)
