"""The provider protocol: one wire interface (OpenAI, Anthropic, local llama.cpp) bound to one deployment.

Providers speak OpenAI chat-completions shapes on both sides so the rest of Keel never sees a vendor format:
they take an OpenAI request body (``model`` already replaced by the upstream's model id) and return an OpenAI
``chat.completion`` dict, or yield OpenAI ``chat.completion.chunk`` dicts.

Providers do not retry, fall back or enforce wall-clock deadlines: the router wraps them for that. A provider only
honours ``Timeouts.connect`` (where it connects to anything) and raises the :mod:`keel.errors` ``ProviderError``
subclass that matches what went wrong. It must release its resources when the awaiting task is cancelled (client
disconnect, router deadline): for an HTTP upstream that means closing the response; for a local model, stopping
generation at the next token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Provider", "ProviderInfo", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines for one upstream attempt, in seconds. ``None`` disables one.

    - ``connect``: opening a connection to the upstream (providers enforce it).
    - ``total``: the whole attempt; for a stream, the whole stream (the router enforces it).
    - ``first_token``: a stream's first chunk (the router enforces it; retry is still possible before it).
    """

    connect: float | None = 5.0
    total: float | None = 60.0
    first_token: float | None = 30.0


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What a provider knows about its model, for logs, readiness and token budgeting."""

    interface: str
    model: str
    context_window: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    """A deployment's wire interface. See the module docstring for the contract."""

    info: ProviderInfo

    async def complete(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        """Non-streaming chat completion; returns an OpenAI ``chat.completion`` dict (with ``usage``)."""
        ...

    def stream(self, body: dict[str, Any], timeouts: Timeouts) -> AsyncIterator[dict[str, Any]]:
        """Streaming chat completion; yields OpenAI ``chat.completion.chunk`` dicts.

        The router sets ``stream: true`` and ``stream_options.include_usage: true`` in ``body``; the provider
        yields a usage chunk (``choices: []``, ``usage`` set) last when the upstream reports usage. Errors before
        the first chunk are raised from the first ``__anext__``; errors later are raised mid-iteration.
        """
        ...

    async def embed(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        """OpenAI ``/v1/embeddings``; providers that cannot embed raise ``InvalidRequest``."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """Cheap readiness check for ``/ready``: (ok, detail). Must not call the model."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and model memory."""
        ...
