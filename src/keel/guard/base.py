"""The guardrail contract: a :class:`Check` looks at one text and reports :class:`Finding` s; the runner
(:mod:`keel.guard.runner`) decides what they mean from the app's config (block, redact or warn), runs independent
checks concurrently under their timeouts and failure policies, and reports the total cost.

Checks never act themselves. A check says *what* it found and *where* (character spans, for redaction); the
configured action says what happens. That keeps checks reusable across apps with different policies and lets the
check-only API (``POST /v1/guardrails/check``) and the benchmarks run exactly what a chat turn runs.

The embedding of the text is shared: :meth:`GuardInput.embedding` embeds it once (through the shared embedder,
whose cache also serves retrieval), however many checks ask.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from keel.context import RequestContext

__all__ = ["Action", "Check", "Direction", "Finding", "GuardInput", "Span", "string_list"]

Direction = Literal["input", "output"]
Action = Literal["block", "redact", "warn"]


@dataclass(frozen=True, slots=True)
class Span:
    """Characters ``[start, end)`` of the checked text that hold an entity (``EMAIL_ADDRESS``, ``CREDIT_CARD``, ...);
    redaction replaces them with ``<ENTITY>``."""

    start: int
    end: int
    entity: str


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found. ``reason`` is machine-readable and stable (``prompt_injection``, ``pii.email``,
    ``off_topic``, ``system_prompt_leak``, ...); ``detail`` is for humans and must never echo secrets or PII.
    ``score`` is the check's confidence where it has one (compared with the configured threshold by the check)."""

    check: str
    reason: str
    detail: str
    score: float | None = None
    spans: tuple[Span, ...] = ()


@dataclass(slots=True)
class GuardInput:
    """What a check sees. ``context``: the retrieved knowledge the answer was built from (output checks compare
    contact details against it); ``system_prompt``: the system messages sent upstream (leak check);
    ``schema``: the JSON schema the output must satisfy, if the prompt declares one; ``request``: the Keel request
    the text belongs to, which model calls a check makes are billed to."""

    text: str
    direction: Direction
    app: str | None = None
    context: str | None = None
    system_prompt: str | None = None
    schema: Mapping[str, Any] | None = None
    embed: Callable[[list[str]], Awaitable[npt.NDArray[np.float32]]] | None = None
    request: RequestContext | None = field(default=None, repr=False)
    _embedding: asyncio.Future[npt.NDArray[np.float32]] | None = field(default=None, repr=False)

    async def embedding(self) -> npt.NDArray[np.float32]:
        """The text's normalized embedding, computed once and shared by every check that asks."""
        if self._embedding is None:
            if self.embed is None:
                raise RuntimeError("no embedder configured for guardrails")
            self._embedding = asyncio.ensure_future(self._embed_once(self.embed))
        return await asyncio.shield(self._embedding)

    async def _embed_once(self, embed: Callable[[list[str]], Awaitable[npt.NDArray[np.float32]]]) -> Any:
        return (await embed([self.text]))[0]


class Check(Protocol):
    """One guardrail check. ``name`` is what config refers to. ``check`` must be cheap to cancel (the runner
    enforces timeouts) and must not raise for any input text; an exception is treated by the runner as a failure
    of the check and handled by its failure policy.

    Optional: a class attribute ``stream_scope = "whole"`` says the check needs the whole answer, so on a stream it
    runs once at the end instead of on each window (``json_schema``). Keel calls every configured check once at
    start on a harmless text (:func:`keel.guard.registry.warm_up`), so lazy loading there happens before the first
    user's timeout applies."""

    name: str

    async def check(self, inp: GuardInput) -> list[Finding]: ...


def string_list(option: str, values: object, *, non_empty: bool = False) -> list[str]:
    """A check option that must be a list of strings (None: empty), checked when the check is built."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{option} must be a list of strings, got {values!r}")
    if non_empty and any(not v.strip() for v in values):
        raise ValueError(f"{option} must not contain empty strings")
    return list(values)
