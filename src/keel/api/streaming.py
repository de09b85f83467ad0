"""Server-sent events to the client, following the streaming contract in DESIGN.md.

- The first chunk is already in hand when the response starts (the router primed it), so every failure before
  it was answered with a proper HTTP error instead.
- Usage: the router always asks the upstream for it. A client that asked for ``include_usage`` gets the usual
  separate usage chunk; any other client gets ``usage`` on the final chunk that carries ``finish_reason``, which
  clients that read ``choices[0]`` on every chunk tolerate. Usage the upstream never sent is estimated, and marked.
- An upstream failure after the first chunk becomes an ``event: error`` with an OpenAI error object, and the
  stream ends without ``data: [DONE]``, so no client mistakes a broken answer for a complete one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.context import RequestContext
from keel.errors import KeelError, UpstreamError
from keel.llm.router import PrimedStream
from keel.llm.tokens import estimate_usage

__all__ = ["sse_events"]

_DONE = b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _error_event(error: KeelError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(error.to_body()) + b"\n\n"


async def sse_events(ctx: RequestContext, stream: PrimedStream, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for event in _events(ctx, stream, include_usage):
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Cancellation scopes would cancel any await here, so the deferred work (spend
        # settlement, the log line) runs in a task of its own.
        ctx.status, ctx.outcome = 499, "client_closed"
        ctx.finish_soon()
        raise
    await ctx.finish()


async def _events(ctx: RequestContext, stream: PrimedStream, include_usage: bool) -> AsyncIterator[bytes]:
    held: dict[str, Any] | None = None  # the finish_reason chunk, waiting for usage
    text: list[str] = []
    try:
        async for chunk in stream:
            if ctx.ttft_ms is None:
                ctx.ttft_ms = ctx.elapsed_ms
            ctx.chunks += 1
            choices = chunk.get("choices") or []
            usage = chunk.get("usage")
            if usage:
                ctx.usage = usage
            if not choices:
                if usage and not include_usage:
                    if held is not None:
                        held["usage"] = usage
                        yield _event(held)
                        held = None
                    continue
                if held is not None:
                    yield _event(held)
                    held = None
                yield _event(chunk)
                continue
            for c in choices:
                content = (c.get("delta") or {}).get("content")
                if isinstance(content, str):
                    text.append(content)
            if held is not None:
                yield _event(held)
                held = None
            if not include_usage and any(c.get("finish_reason") for c in choices):
                held = chunk
                continue
            yield _event(chunk)
    except KeelError as exc:
        error: KeelError = exc
    except Exception as exc:  # a provider bug must still end the stream visibly, never as a success
        error = UpstreamError(f"the stream failed: {type(exc).__name__}")
    else:
        if ctx.usage is None:
            ctx.usage = estimate_usage(ctx.body.get("messages") or [], "".join(text))
            ctx.usage_estimated = True
            if held is not None:
                held["usage"] = {**ctx.usage, "estimated": True}
            elif include_usage:
                yield _event({**stream.first, "choices": [], "usage": {**ctx.usage, "estimated": True}})
        if held is not None:
            yield _event(held)
        yield _DONE
        return
    if held is not None:
        yield _event(held)
    ctx.fail(error, outcome="upstream_broke")
    yield _error_event(error)
