"""HTTP plumbing shared by the HTTP wire interfaces: the SSE reader, Retry-After parsing and the mapping from an
upstream's status and body to Keel's :mod:`keel.errors` tree."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from httptools import HttpParserError

from keel.errors import (
    ContentFiltered,
    ContextWindowExceeded,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
)
from keel.llm.client import Response, UpstreamClient

__all__ = ["error_from_response", "iter_sse", "parse_retry_after", "upstream_request"]

_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context window",
    "prompt is too long",
    "too many tokens",
    "reduce the length",
)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _message_of(body: bytes) -> tuple[str, str | None]:
    """(message, code) from an OpenAI or Anthropic error body, or the raw text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip() or "no error body", None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(err.get("message") or err), str(code) if code else None
    if isinstance(err, str):
        return err, None
    return str(data)[:500], None


def error_from_response(status: int, body: bytes, headers: Mapping[str, str], deployment: str) -> ProviderError:
    """Classify an upstream error response (any non-2xx)."""
    message, code = _message_of(body)
    text = f"upstream {deployment} answered {status}: {message}"
    lowered = f"{code or ''} {message}".lower()
    if 300 <= status < 400:  # not followed: a POST re-sent elsewhere is not what the config says
        where = headers.get("location") or "nowhere"
        return ProviderError(
            f"upstream {deployment} answered {status}, redirecting to {where}; Keel does not follow redirects: "
            "set the deployment's api_base to the final URL",
            deployment=deployment,
            code="upstream_redirect",
        )
    if status == 429:
        return RateLimited(text, deployment=deployment, retry_after=parse_retry_after(headers))
    if status in (408, 504):
        return ProviderTimeout(text, deployment=deployment)
    if status >= 500 or status == 409:
        return UpstreamError(text, deployment=deployment, retry_after=parse_retry_after(headers))
    if any(m in lowered for m in _CONTEXT_MARKERS):
        return ContextWindowExceeded(text, deployment=deployment)
    if "content_filter" in lowered or "content management policy" in lowered:
        return ContentFiltered(text, deployment=deployment)
    if status in (401, 403):
        # The client did nothing wrong: Keel's own upstream credentials are bad. Never echo the upstream's text,
        # which may quote part of the key.
        return UpstreamError(
            f"upstream {deployment} rejected Keel's credentials ({status}); check the deployment's api_key",
            deployment=deployment,
            status=502,
        )
    return UpstreamRejected(text, deployment=deployment, status=status if 400 <= status < 500 else 400, code=code)


@asynccontextmanager
async def upstream_request(
    client: UpstreamClient,
    method: str,
    url: str,
    *,
    deployment: str,
    json_body: Any,
    headers: Mapping[str, str],
    connect_timeout: float | None,
) -> AsyncIterator[Response]:
    """Send one request and yield the 2xx response; raise the classified ``ProviderError`` otherwise.

    Wall-clock deadlines belong to the router; here only the connect timeout and transport errors are handled.
    The response is always released on exit, including on cancellation (that closes its connection, which is what
    frees the upstream).
    """
    try:
        resp = await client.request(
            method, url, headers=headers, body=orjson.dumps(json_body), connect_timeout=connect_timeout
        )
    except TimeoutError as exc:
        raise ProviderTimeout(f"upstream {deployment} timed out connecting", deployment=deployment) from exc
    except HttpParserError as exc:
        raise UpstreamError(
            f"upstream {deployment} sent a malformed HTTP response: {exc}", deployment=deployment
        ) from exc
    except (OSError, ValueError) as exc:
        raise UpstreamError(f"upstream {deployment} unreachable: {_describe(exc)}", deployment=deployment) from exc
    try:
        if resp.status >= 300:
            body = await _body(resp, deployment)
            raise error_from_response(resp.status, body, resp.headers, deployment)
        yield resp
    finally:
        resp.release()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _body(resp: Response, deployment: str) -> bytes:
    try:
        return await resp.read()
    except (OSError, HttpParserError) as exc:
        raise UpstreamError(
            f"upstream {deployment} broke the response body: {_describe(exc)}", deployment=deployment
        ) from exc


async def read_json(resp: Response, deployment: str) -> dict[str, Any]:
    """The response body as a JSON object, or ``UpstreamError`` when it is not one."""
    body = await _body(resp, deployment)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"upstream {deployment} sent malformed JSON: {body[:120]!r}", deployment=deployment
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"upstream {deployment} sent JSON that is not an object", deployment=deployment)
    return data


async def iter_sse(
    resp: Response, deployment: str, *, on_event: Callable[[], None] | None = None
) -> AsyncIterator[tuple[str | None, bytes]]:
    """Yield ``(event, data)`` per server-sent event. Multi-line ``data:`` fields are joined with newlines.

    A body that ends without a terminating blank line, or breaks mid-way, raises ``UpstreamError`` so that a cut
    stream is never mistaken for a finished one.
    """
    event: str | None = None
    data: list[bytes] = []
    pending = b""
    try:
        async for chunk in resp.iter_chunks():
            lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
            pending = lines.pop()  # the unfinished last line (b"" when the chunk ended a line)
            for raw in lines:
                line = raw[:-1] if raw.endswith(b"\r") else raw
                if not line:
                    if data:
                        if on_event is not None:
                            on_event()
                        yield event, b"\n".join(data)
                    event, data = None, []
                    continue
                if line.startswith(b":"):
                    continue
                field, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    event = value.decode("utf-8", "replace")
    except (OSError, HttpParserError) as exc:
        raise UpstreamError(f"upstream {deployment} broke the stream: {_describe(exc)}", deployment=deployment) from exc
    if data or pending.strip():
        raise UpstreamError(f"upstream {deployment} ended the stream mid-event", deployment=deployment)
