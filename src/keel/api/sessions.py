"""Chat sessions over HTTP: Keel keeps the conversation, so a client sends only the new message.

Every route authenticates like ``/v1/chat/completions``. A session belongs to its creator's user (the master key
and open mode each count as one owner); anyone else gets 404, exactly as for a session that does not exist.

::

    POST   /v1/sessions                      {"app"?, "title"?, "metadata"?}            → 201 session
    GET    /v1/sessions?limit=20&offset=0                                               → list of sessions
    DELETE /v1/sessions?user=me              delete all the caller's sessions ("delete my data"); the master
                                             key may name a user id instead of ``me``  → {"deleted": n}
    GET    /v1/sessions/{id}                                                            → session
    DELETE /v1/sessions/{id}                 the session and its messages               → {"deleted": true}
    POST   /v1/sessions/{id}/messages        {"content", "stream"?, "pinned"?, "variables"?, "stream_options"?}
    GET    /v1/sessions/{id}/messages?after=0&limit=100   export, oldest first; page on with ``after=next_after``
    PATCH  /v1/sessions/{id}/messages/{seq}  {"pinned": bool}                           → message

A message runs the pipeline like any model call (route ``app.chat``: auth, model permission, rate limits,
budgets, accounting) with the prompt built from the session (:mod:`keel.history`). The answer::

    {"id": request id, "object": "session.turn", "session_id", "model",
     "message": {"seq", "role": "assistant", "content", "created_at", "finish_reason", "citations"},
     "user_message": {"seq"}, "citations": [...], "usage": {..., "cost"},
     "history": {"prompt_tokens", "limit", "context_window", "counter", "dropped", "summary"}}

Streaming (``"stream": true``) sends OpenAI ``chat.completion.chunk`` events exactly as ``/v1/chat/completions``
does (usage and cost on the final chunk), then, once the answer is saved, ``event: session`` whose data is the
object above without ``usage`` and without the message ``content`` (the chunks carried it), then
``data: [DONE]``. A stream that breaks ends with ``event: error`` and no ``[DONE]``, as everywhere in Keel.

Guardrails (the app's ``guardrails`` config, :mod:`keel.api.guarded`): input checks run on the new message
before anything else, so a blocked message (400 ``guardrail_error`` with the app's refusal) costs no model call
and is not stored, and a redacted one is stored and sent redacted; output checks run on the answer before it is
returned, or on the stream as it goes out (a block ends it with ``event: error``, no ``[DONE]``).

What is saved: the user message when the turn starts; the answer only once it is complete. If the model was
never reached (refused by limits, budgets, or a message too long for the window) nothing is kept. If the answer
failed or broke off, the user message stays, marked ``"status": "failed"``; sending the same text again retries
it without saving it twice. Two messages sent at once to one session are answered one after the other, across
workers too (:mod:`keel.store.sessions`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from keel.api.context import SSE_HEADERS, closed, fail, keel_headers, new_context, price_result
from keel.api.guarded import OutputScope, check_input, guard_answer
from keel.api.http import ClientClosed, error_response, json_response, read_json, until_disconnect
from keel.api.incoming import AsgiIncoming
from keel.api.schemas import StreamOptions, validate
from keel.api.state import AppState
from keel.api.streaming import DONE, sse_events
from keel.config import AppConfig, KeelConfig
from keel.context import RequestContext
from keel.errors import InvalidRequest, KeelError, NotFound, PermissionDenied
from keel.guard.registry import AppGuards
from keel.history import Budget, BuiltContext
from keel.llm.router import PrimedStream
from keel.llm.tokens import message_text
from keel.pipeline.prompt import request_options
from keel.store.models import ChatMessage, ChatSession
from keel.store.sessions import Turn, owner_of, user_owner
from keel.views import iso

__all__ = ["router"]

router = APIRouter()

_RETRIEVAL_TURNS = 10  # newest messages handed to retrieval, for follow-up questions


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionIn(_Body):
    app: str | None = None
    title: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None


class MessageIn(_Body):
    content: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    pinned: bool = False
    variables: dict[str, str] = Field(default_factory=dict)


class PinIn(_Body):
    pinned: bool


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SessionsPage(_Query):
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0)


class MessagesPage(_Query):
    after: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)


def session_view(row: ChatSession) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "session",
        "app": row.app,
        "title": row.title,
        "message_count": row.last_seq,
        "summary": {"text": row.summary, "upto_seq": row.summary_upto} if row.summary else None,
        "metadata": row.metadata_ or {},
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "last_message_at": iso(row.last_message_at),
    }


def message_view(m: ChatMessage) -> dict[str, Any]:
    return {
        "seq": m.seq,
        "role": m.role,
        "content": m.content,
        "pinned": m.pinned,
        "status": m.status,
        "tokens": m.tokens,
        "request_id": m.request_id,
        "metadata": m.metadata_ or {},
        "created_at": iso(m.created_at),
    }


async def _caller(request: Request) -> tuple[AppState, str]:
    """The app state and the caller's owner id; authentication first, before the request is looked at."""
    state: AppState = request.app.state.keel
    principal = await state.auth.principal(request.headers.get("authorization"))
    return state, owner_of(principal)


def _app(config: KeelConfig, name: str | None) -> AppConfig:
    app = config.app(name)
    if app is not None:
        return app
    names = ", ".join(a.name for a in config.apps)
    if not config.apps:
        raise InvalidRequest("No apps are configured; add one under `apps:` in the config to use sessions.")
    if name is None:
        raise InvalidRequest(f"Several apps are configured; name one in 'app' ({names}).", param="app")
    raise NotFound(f"No app {name!r}; configured: {names}.", param="app", code="app_not_found")


@router.post("/v1/sessions", status_code=201)
async def create_session(request: Request) -> Response:
    try:
        state: AppState = request.app.state.keel
        principal = await state.auth.principal(request.headers.get("authorization"))
        body = validate(SessionIn, await read_json(request, state.config.server.max_body_bytes))
        app = _app(state.config, body.app)
        row = await state.sessions.create(
            owner_of(principal),
            app.name,
            key_id=principal.key_id,
            user_id=principal.user_id,
            title=body.title,
            metadata=body.metadata,
        )
    except KeelError as exc:
        return error_response(exc)
    return json_response(session_view(row), 201)


@router.get("/v1/sessions")
async def list_sessions(request: Request) -> Response:
    try:
        state, owner = await _caller(request)
        page = validate(SessionsPage, dict(request.query_params))
        rows = await state.sessions.list(owner, limit=page.limit + 1, offset=page.offset)
    except KeelError as exc:
        return error_response(exc)
    data = [session_view(r) for r in rows[: page.limit]]
    return json_response({"object": "list", "data": data, "has_more": len(rows) > page.limit})


@router.delete("/v1/sessions")
async def delete_my_sessions(request: Request) -> Response:
    try:
        state: AppState = request.app.state.keel
        principal = await state.auth.principal(request.headers.get("authorization"))
        user = request.query_params.get("user")
        if not user:
            raise InvalidRequest("Say whose sessions to delete: ?user=me deletes all of yours.", param="user")
        if user == "me":
            owner = owner_of(principal)
        elif principal.kind == "master":
            owner = user_owner(user)
        else:
            raise PermissionDenied("Only the master key may delete another user's sessions; use ?user=me.")
        deleted = await state.sessions.delete_all(owner)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"object": "session.deleted_all", "deleted": deleted})


@router.get("/v1/sessions/{session_id}")
async def get_session(request: Request, session_id: str) -> Response:
    try:
        state, owner = await _caller(request)
        row = await state.sessions.get(owner, session_id)
    except KeelError as exc:
        return error_response(exc)
    return json_response(session_view(row))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(request: Request, session_id: str) -> Response:
    try:
        state, owner = await _caller(request)
        await state.sessions.delete(owner, session_id)
    except KeelError as exc:
        return error_response(exc)
    return json_response({"id": session_id, "object": "session.deleted", "deleted": True})


@router.get("/v1/sessions/{session_id}/messages")
async def export_messages(request: Request, session_id: str) -> Response:
    try:
        state, owner = await _caller(request)
        page = validate(MessagesPage, dict(request.query_params))
        rows = await state.sessions.messages(owner, session_id, after=page.after, limit=page.limit + 1)
    except KeelError as exc:
        return error_response(exc)
    data = [message_view(m) for m in rows[: page.limit]]
    more = len(rows) > page.limit
    return json_response(
        {"object": "list", "data": data, "has_more": more, "next_after": data[-1]["seq"] if more else None}
    )


@router.patch("/v1/sessions/{session_id}/messages/{seq}")
async def pin_message(request: Request, session_id: str, seq: int) -> Response:
    try:
        state, owner = await _caller(request)
        body = validate(PinIn, await read_json(request, state.config.server.max_body_bytes))
        message = await state.sessions.set_pinned(owner, session_id, seq, body.pinned)
    except KeelError as exc:
        return error_response(exc)
    return json_response(message_view(message))


# -- a turn ----------------------------------------------------------------------------------------------------------


@router.post("/v1/sessions/{session_id}/messages")
async def send_message(request: Request, session_id: str) -> Response:
    state: AppState = request.app.state.keel
    ctx = new_context(AsgiIncoming(request), "app.chat")
    ctx.session_id = session_id
    turn: Turn | None = None
    try:
        ctx.principal = await state.auth.principal(ctx.authorization)
        owner = owner_of(ctx.principal)
        body = validate(MessageIn, await read_json(request, state.config.server.max_body_bytes))
        limit = state.config.sessions.max_message_chars
        if len(body.content) > limit:
            raise InvalidRequest(
                f"The message is {len(body.content)} characters long; the limit is {limit} "
                "(sessions.max_message_chars).",
                param="content",
                code="message_too_long",
                status=413,
            )
        question = body.content
        guards = await _guards(state, owner, session_id) if state.guards else None
        if guards is not None and guards.input is not None:  # before the message is stored or sent anywhere
            question = (await check_input(guards, ctx, question, state.embedder.embed)).text
        turn = await until_disconnect(
            request,
            state.sessions.begin_turn(owner, session_id, question, pinned=body.pinned, request_id=ctx.request_id),
        )
        app = _app(state.config, turn.session.app)
        ctx.public_model, ctx.stream, ctx.variables = app.model, body.stream, body.variables
        new = {"role": "user", "content": question}
        built, budget, citations, scope = await _prompt(state, app, ctx, turn, new)
        question_tokens = await state.history.message_tokens(ctx.public_model or app.model, new)
        result = await until_disconnect(request, state.pipeline.chat(ctx))
        if guards is not None and guards.output is not None:
            result = await until_disconnect(request, guard_answer(state, guards, ctx, result, scope))
    except KeelError as exc:
        if turn is not None:
            await _unanswered(state, ctx, turn, exc)
        return await fail(ctx, exc)
    except ClientClosed:
        if turn is not None:
            await _unanswered(state, ctx, turn, None)
        return await closed(ctx)
    except BaseException:
        if turn is not None:
            state.sessions.abandon(turn, {"code": "server_error"})
        raise
    reply = _Reply(state, app, owner, ctx, turn, built, budget, citations, question_tokens)
    if isinstance(result, dict):
        price_result(ctx, result, state)
        choice = (result.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content")
        try:
            saved = await reply.save(content if isinstance(content, str) else "", choice.get("finish_reason"))
        except KeelError as exc:
            return await fail(ctx, exc)
        await ctx.finish()
        view = {**reply.view(saved, with_content=True), "usage": result.get("usage")}
        return json_response(view, headers=keel_headers(ctx))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    headers = {**SSE_HEADERS, **keel_headers(ctx)}
    headers.pop("x-keel-cost-usd", None)  # not known yet: it comes in the final chunk's usage
    return _TurnStream(
        reply.events(result, include_usage),
        on_close=lambda: reply.abandon("client_closed"),
        media_type="text/event-stream",
        headers=headers,
    )


async def _guards(state: AppState, owner: str, session_id: str) -> AppGuards | None:
    """The guardrails of the session's app, known before the turn starts (the message must be checked before it
    is stored); with one app configured that is the one, else the session says."""
    apps = state.config.apps
    name = apps[0].name if len(apps) == 1 else (await state.sessions.get(owner, session_id)).app
    return state.guards.get(name)


async def _prompt(
    state: AppState, app: AppConfig, ctx: RequestContext, turn: Turn, new: dict[str, Any]
) -> tuple[BuiltContext, Budget, list[dict[str, Any]], OutputScope]:
    """System messages, retrieved context and the history that fits: sets ``ctx.body``. The scope is what output
    guardrails compare the answer with."""
    recent = [{"role": m.role, "content": m.content} for m in turn.history[-_RETRIEVAL_TURNS:]]
    context, citations = await state.context_source.retrieve(app, ctx, [*recent, new])
    resolved, system = await state.system_prompts.prepare(app, ctx, ctx.variables, context)
    if resolved is not None and resolved.model:
        # The prompt version names its model (an experiment arm may try another one): the history is fitted to
        # that model's window, and the pipeline's auth stage checks the caller's key may use it.
        ctx.public_model = resolved.model
    model = ctx.public_model or app.model
    built, budget = await state.history.build(
        app, system=system, summary=turn.session.summary, history=turn.history, new=new, model=model
    )
    ctx.body = {
        **(request_options(resolved.prompt) if resolved is not None else {}),
        "model": model,
        "messages": built.messages,
        "max_completion_tokens": app.history.reserve_output_tokens,
        "stream": ctx.stream,
    }
    schema = resolved.output_schema if resolved is not None else None
    scope = OutputScope("\n\n".join(message_text(m.get("content")) for m in system) or None, context, schema)
    return built, budget, citations, scope


async def _unanswered(state: AppState, ctx: RequestContext, turn: Turn, exc: KeelError | None) -> None:
    """End a turn that got no answer: forgotten if no model saw it, else kept as failed (retry by resending)."""
    if not ctx.attempts:
        await state.sessions.discard(turn)
    else:
        await state.sessions.fail(turn, exc.to_body()["error"] if exc else {"code": "client_closed"})


class _Reply:
    """The answer side of a turn: saving it, the response body, and the streamed events."""

    def __init__(
        self,
        state: AppState,
        app: AppConfig,
        owner: str,
        ctx: RequestContext,
        turn: Turn,
        built: BuiltContext,
        budget: Budget,
        citations: list[dict[str, Any]],
        question_tokens: int,
    ) -> None:
        self.state, self.app, self.owner, self.ctx, self.turn = state, app, owner, ctx, turn
        self.built, self.budget, self.citations, self.question_tokens = built, budget, citations, question_tokens

    async def save(self, content: str, finish_reason: Any) -> ChatMessage:
        usage = self.ctx.usage or {}
        completion = usage.get("completion_tokens")
        metadata: dict[str, Any] = {"model": self.ctx.public_model, "finish_reason": finish_reason, "usage": usage}
        if self.citations:
            metadata["citations"] = self.citations
        saved = await self.state.sessions.complete(
            self.turn,
            content,
            tokens=completion if isinstance(completion, int) else None,
            request_id=self.ctx.request_id,
            metadata=metadata,
            question_tokens=self.question_tokens,
        )
        if self.app.history.strategy == "summary" and self.built.dropped:
            self.state.history.summarizer.schedule(
                self.app, self.owner, self.turn.session.id, max(self.built.dropped), self.ctx.principal
            )
        return saved

    def view(self, saved: ChatMessage, *, with_content: bool) -> dict[str, Any]:
        message: dict[str, Any] = {
            "seq": saved.seq,
            "role": "assistant",
            "created_at": iso(saved.created_at),
            "finish_reason": saved.metadata_.get("finish_reason"),
            "citations": self.citations,
        }
        if with_content:
            message["content"] = saved.content
        return {
            "id": self.ctx.request_id,
            "object": "session.turn",
            "session_id": self.turn.session.id,
            "model": self.ctx.public_model,
            "message": message,
            "user_message": {"seq": self.turn.user_seq},
            "citations": self.citations,
            "history": {
                "prompt_tokens": self.built.prompt_tokens,
                "limit": self.budget.prompt_tokens,
                "context_window": self.budget.window,
                "counter": self.budget.counter.name,
                "dropped": len(self.built.dropped),
                "summary": self.built.summary_used,
            },
        }

    async def events(self, stream: PrimedStream, include_usage: bool) -> AsyncIterator[bytes]:
        """The chunks as ``/v1/chat/completions`` sends them, then the saved turn just before ``[DONE]``."""
        parts: list[str] = []
        finish: list[Any] = []
        saved: ChatMessage | None = None
        try:
            tapped = _recording(stream, parts, finish)
            async with aclosing(sse_events(self.ctx, tapped, include_usage, self.state.accounting.price)) as events:
                async for event in events:
                    if event == DONE:
                        try:
                            saved = await self.save("".join(parts), finish[-1] if finish else None)
                        except KeelError as exc:  # the session was deleted meanwhile: no [DONE], nothing kept
                            self.ctx.fail(exc)
                            return
                        view = self.view(saved, with_content=False)
                        yield b"event: session\ndata: " + orjson.dumps(view) + b"\n\n"
                    yield event
        except BaseException:
            self.abandon("client_closed")
            raise
        if saved is None:  # the stream broke: sse_events sent the error event
            error = self.ctx.error
            await self.state.sessions.fail(self.turn, error.to_body()["error"] if error else {"code": "upstream_error"})

    def abandon(self, code: str) -> None:
        """Free the session from a path that cannot wait (client gone, or a response that never started)."""
        self.state.sessions.abandon(self.turn, {"code": code})
        self.ctx.finish_soon()


def _recording(stream: PrimedStream, parts: list[str], finish: list[Any]) -> PrimedStream:
    """The same stream, keeping the answer's text and finish reason as they pass."""

    def note(chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                parts.append(content)
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])

    async def rest() -> AsyncGenerator[dict[str, Any], None]:
        async for chunk in stream.rest:
            note(chunk)
            yield chunk

    note(stream.first)
    tapped = rest()

    async def close() -> None:
        await tapped.aclose()
        await stream.close()

    return PrimedStream(stream.first, tapped, stream.deadline, close)


class _TurnStream(StreamingResponse):
    """A streaming response that ends its turn even if its body is never iterated (the client left before the
    response started), so the session is never left locked in this worker."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
