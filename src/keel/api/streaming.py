"""Server-sent events to the client, following the streaming contract in DESIGN.md.

- The first chunk is already in hand when the response starts (the router primed it), so every failure before
  it was answered with a proper HTTP error instead.
- Usage: the router always asks the upstream for it. A client that asked for ``include_usage`` gets the usual
  separate usage chunk; any other client gets ``usage`` on the final chunk that carries ``finish_reason``, which
  clients that read ``choices[0]`` on every chunk tolerate. Usage the upstream never sent is estimated, and marked.
  The usage object also carries Keel's ``cost`` in US dollars (``null`` when the model has no price).
- An upstream failure after the first chunk becomes an ``event: error`` with an OpenAI error object, and the
  stream ends without ``data: [DONE]``, so no client mistakes a broken answer for a complete one. An output
  guardrail that blocks mid-stream (:mod:`keel.guard.stream`) ends it the same way, with a ``guardrail_error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Final

import orjson

from keel.context import RequestContext
from keel.errors import GuardrailBlocked, KeelError, UpstreamError
from keel.llm.router import PrimedStream
from keel.llm.tokens import estimate_usage

__all__ = ["DONE", "sse_events"]

DONE: Final = b"data: [DONE]\n\n"  # the last event of a complete stream


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _error_event(error: KeelError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(error.to_body()) + b"\n\n"


Pricer = Callable[[RequestContext], None]


async def sse_events(
    ctx: RequestContext, stream: PrimedStream, include_usage: bool, price: Pricer
) -> AsyncGenerator[bytes, None]:
    try:
        async for event in _events(ctx, stream, include_usage, price):
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Cancellation scopes would cancel any await here, so the deferred work (spend
        # settlement, the log line) runs in a task of its own.
        ctx.status, ctx.outcome = 499, "client_closed"
        ctx.finish_soon()
        raise
    await ctx.finish()


def _costed(ctx: RequestContext, usage: dict[str, Any], price: Pricer) -> dict[str, Any]:
    ctx.usage = usage
    price(ctx)
    return {**usage, "cost": None if ctx.cost_micros is None else ctx.cost_micros / 1_000_000}


async def _events(
    ctx: RequestContext, stream: PrimedStream, include_usage: bool, price: Pricer
) -> AsyncIterator[bytes]:
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
                chunk["usage"] = usage = _costed(ctx, usage, price)
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
            ctx.usage_estimated = True
            estimated = {**estimate_usage(ctx.body.get("messages") or [], "".join(text)), "estimated": True}
            if held is not None:
                held["usage"] = _costed(ctx, estimated, price)
            elif include_usage:
                yield _event({**stream.first, "choices": [], "usage": _costed(ctx, estimated, price)})
        if held is not None:
            yield _event(held)
        yield DONE
        return
    if held is not None:
        yield _event(held)
    ctx.fail(error, outcome="guardrail_blocked" if isinstance(error, GuardrailBlocked) else "upstream_broke")
    yield _error_event(error)
