"""A scripted fake LLM upstream: an OpenAI- and Anthropic-compatible HTTP server for tests and benchmarks.

Run it on the current event loop (:class:`FakeUpstream`), on a loop in a daemon thread (:class:`FakeUpstreamThread`)
or as a process, which prints ``fake upstream listening on http://HOST:PORT`` once it is up::

    python -m keel.testing.fake_upstream --host 127.0.0.1 --port 9100 \\
        [--delay-s 0.0] [--delay-jitter-s 0.0] [--seed N] [--chunk-delay-s 0.0] [--api-key KEY] [--no-record]

Routes: ``POST /v1/chat/completions`` (OpenAI; ``stream: true`` for SSE), ``GET /v1/models``, ``POST /v1/embeddings``
(deterministic unit vectors hashed from each input, 8 dimensions unless the request says ``dimensions``) and
``POST /v1/messages`` (Anthropic, streaming too). OpenAI SDKs take ``base_url + "/v1"``, Anthropic SDKs ``base_url``.
Started with an API key, the OpenAI routes want ``Authorization: Bearer KEY`` and ``/v1/messages`` wants
``x-api-key: KEY`` (or the bearer header, which recent anthropic SDKs send); anything else gets a 401 in the
vendor's error shape.

Default answer: ``"Echo: "`` + the text of the last user message (its first 200 characters), streamed one word per
chunk. ``prompt_tokens`` counts the words of all messages (and of an Anthropic ``system``), at least 1;
``completion_tokens`` the words of the answer. ``max_tokens`` / ``max_completion_tokens`` cut a text answer to that
many words with finish reason ``length`` (Anthropic: ``max_tokens``). An OpenAI stream ends with a ``choices: []``
usage chunk only if the request sets ``stream_options.include_usage``.

Scripting: each completion request (OpenAI or Anthropic; not embeddings) takes the next *step* from a FIFO queue, the
queue of its ``model`` if that one is not empty, else the global queue, and with both empty gets the default answer.
Queue steps with ``fake.script(*steps, model=None)`` or ``POST /_fake/script {"steps": [...], "model": "..."}``.
A step is a dict combining these keys:

- ``content: str``: answer with this text instead of the echo.
- ``tool_calls: [{"name": str, "arguments": dict | str}]``: call these tools (a string is sent as is); finish reason
  ``tool_calls`` (Anthropic: ``tool_use`` blocks, stop reason ``tool_use``); streams send each call's arguments in
  at least two pieces.
- ``usage: {"prompt_tokens": int, "completion_tokens": int}``: report these counts (Anthropic: input/output tokens).
- ``status: int``: fail with this HTTP status; ``message``, ``type`` and ``code`` override the error body's fields.
  ``retry_after: float`` adds ``Retry-After`` (seconds, may be fractional), ``retry_after_ms: float`` adds
  ``retry-after-ms``.
- ``context_length_exceeded: true``: fail with 400 ``context_length_exceeded`` as OpenAI words it (Anthropic:
  "prompt is too long").
- ``delay_s: float``: wait before sending the response headers (default: the server's ``delay_s``).
- ``first_chunk_delay_s: float``: streams: send the headers at once, then wait before the first event.
- ``chunk_delay_s: float``: streams: wait between content chunks (default: the server's ``chunk_delay_s``).
- ``cut_after_chunks: int``: streams: send this many content chunks, then drop the connection mid-body.
- ``end_after_chunks: int``: streams: send this many content chunks, then end the body cleanly, without the
  closing events (``[DONE]``, ``message_stop``): a proxy that gave up politely.
- ``malformed: true``: answer 200 with a body that is not JSON; streams: one event with broken JSON after the first
  content chunk.
- ``hang: true``: never answer, until the client goes away or the server stops.
- ``headers: {name: value}``: add these headers to the response (any status, streams too), e.g. ``Set-Cookie``.
- ``times: int``: queue the step this many times (default 1).

A request may also choose its own delay: ``"metadata": {"fake_delay_s": "0.042"}`` (OpenAI's ``metadata`` field, so
a gateway passes it on) overrides the server's default delay, not a scripted step's. Benchmarks use it to send the
same sequence of delays straight to the fake and through a proxy.

For example ``fake.script({"status": 429, "retry_after": 0.5}, {"content": "ok"}, model="gpt-4o")`` rate-limits the
next ``gpt-4o`` request and answers the one after it with ``ok``.

Control API (JSON, no auth): ``POST /_fake/script``; ``GET /_fake/requests``, the recorded API requests as
``[{"path", "headers", "body"}]`` (header names lowercased, ``authorization`` and ``x-api-key`` values shown as
``***``; the last 10000; none with ``--no-record``); ``GET /_fake/stats``, the counters ``requests``, ``by_path``,
``active`` / ``active_streams`` (completions in flight), ``cancelled`` / ``cancelled_streams`` (completions whose
client went away before the end) and ``queued`` (steps waiting); ``POST /_fake/reset``, which empties the queues, the
recorded requests and the counters. The same operations are :meth:`FakeUpstream.script`, ``requests``, ``stats`` and
``reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import math
import os
import random
import re
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, Self, TypeVar

import orjson
from aiohttp import web

__all__ = ["FakeUpstream", "FakeUpstreamThread", "main"]

_T = TypeVar("_T")

_MAX_RECORDS: Final = 10_000
_ECHO_CHARS: Final = 200
_EMBEDDING_DIMS: Final = 8
_DEFAULT_MODEL: Final = "fake-model"
_SHUTDOWN_TIMEOUT_S: Final = 0.25
_SECRET_HEADERS: Final = frozenset({"authorization", "x-api-key"})
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_MALFORMED_BODY: Final = b'{"id": "chatcmpl-malformed", "choices": [{"message": '
_WORD: Final = re.compile(r"\s*\S+\s*")
_STEP_KEYS: Final = frozenset(
    {
        "chunk_delay_s",
        "code",
        "content",
        "context_length_exceeded",
        "cut_after_chunks",
        "delay_s",
        "end_after_chunks",
        "first_chunk_delay_s",
        "hang",
        "headers",
        "malformed",
        "message",
        "retry_after",
        "retry_after_ms",
        "status",
        "times",
        "tool_calls",
        "type",
        "usage",
    }
)

_Frame = tuple[bytes, bool]
"""One stream event's bytes, and whether it carries content (counts as a chunk for cuts and chunk delays)."""


class _ToolCall(NamedTuple):
    name: str
    arguments: str  # what OpenAI sends: a JSON string
    input: Any  # what Anthropic sends: the parsed arguments


@dataclass(frozen=True, slots=True)
class _Step:
    """A parsed script step; ``None`` means "not said" (server default or normal behaviour)."""

    content: str | None = None
    tool_calls: tuple[_ToolCall, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    headers: Mapping[str, str] | None = None
    context_length_exceeded: bool = False
    delay_s: float | None = None
    first_chunk_delay_s: float = 0.0
    chunk_delay_s: float | None = None
    cut_after_chunks: int | None = None
    end_after_chunks: int | None = None
    malformed: bool = False
    hang: bool = False


_DEFAULT_STEP: Final = _Step()


def _asked_delay(body: dict[str, Any]) -> float | None:
    metadata = body.get("metadata")
    raw = metadata.get("fake_delay_s") if isinstance(metadata, dict) else None
    try:
        delay = float(raw) if isinstance(raw, str | int | float) else None
    except ValueError:
        return None
    return delay if delay is not None and 0 <= delay <= 60 else None


def _opt_float(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


def _opt_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return None if value is None else str(value)


def _header_value(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else str(seconds)


def _parse_tool_call(call: Any) -> _ToolCall:
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
        raise ValueError(f"a tool call needs a string name: {call!r}")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        return _ToolCall(call["name"], orjson.dumps(arguments).decode(), arguments)
    try:
        return _ToolCall(call["name"], arguments, orjson.loads(arguments))
    except orjson.JSONDecodeError:
        return _ToolCall(call["name"], arguments, arguments)


def _parse_step(raw: Any) -> tuple[_Step, int]:
    """Validate one step dict; returns the step and how many times to queue it."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a step must be an object, not {raw!r}")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise ValueError(f"unknown step keys: {sorted(unknown)}")
    usage = raw.get("usage") or {}
    if not isinstance(usage, Mapping):
        raise ValueError(f"usage must be an object, not {usage!r}")
    extra = raw.get("headers") or {}
    if not isinstance(extra, Mapping) or not all(isinstance(v, str) for v in extra.values()):
        raise ValueError(f"headers must be an object of strings, not {extra!r}")
    headers = {str(k): v for k, v in extra.items()}
    if (retry_after := _opt_float(raw, "retry_after")) is not None:
        headers["Retry-After"] = _header_value(retry_after)
    if (retry_after_ms := _opt_float(raw, "retry_after_ms")) is not None:
        headers["retry-after-ms"] = _header_value(retry_after_ms)
    cut = raw.get("cut_after_chunks")
    end = raw.get("end_after_chunks")
    step = _Step(
        content=_opt_str(raw, "content"),
        tool_calls=tuple(_parse_tool_call(call) for call in raw.get("tool_calls") or ()),
        prompt_tokens=None if usage.get("prompt_tokens") is None else int(usage["prompt_tokens"]),
        completion_tokens=None if usage.get("completion_tokens") is None else int(usage["completion_tokens"]),
        status=None if raw.get("status") is None else int(raw["status"]),
        message=_opt_str(raw, "message"),
        error_type=_opt_str(raw, "type"),
        code=_opt_str(raw, "code"),
        headers=headers or None,
        context_length_exceeded=bool(raw.get("context_length_exceeded")),
        delay_s=_opt_float(raw, "delay_s"),
        first_chunk_delay_s=_opt_float(raw, "first_chunk_delay_s") or 0.0,
        chunk_delay_s=_opt_float(raw, "chunk_delay_s"),
        cut_after_chunks=None if cut is None else int(cut),
        end_after_chunks=None if end is None else int(end),
        malformed=bool(raw.get("malformed")),
        hang=bool(raw.get("hang")),
    )
    times = int(raw.get("times", 1))
    if times < 0:
        raise ValueError(f"times must be >= 0, not {times}")
    return step, times


@dataclass(slots=True)
class _Reply:
    """What a completion answers, independent of the wire format."""

    chunks: list[str]  # the answer text split into words; their concatenation is the text
    tool_calls: tuple[_ToolCall, ...]
    finish: str  # "stop" | "length" | "tool_calls" (OpenAI's words)
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def _text(content: Any) -> str:
    """The text of a message content: a string, or a list of parts/blocks (text, Anthropic tool_result)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (_part_text(part) for part in content if isinstance(part, dict))
        return " ".join(text for text in texts if text)
    return ""


def _part_text(part: dict[str, Any]) -> str:
    text = part.get("text")
    return text if isinstance(text, str) else _text(part.get("content"))


def _reply(step: _Step, body: Mapping[str, Any]) -> _Reply:
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = []
    messages = [m for m in messages if isinstance(m, dict)]
    prompt_tokens = step.prompt_tokens
    if prompt_tokens is None:
        words = sum(len(_text(m.get("content")).split()) for m in messages) + len(_text(body.get("system")).split())
        prompt_tokens = max(1, words)
    if step.content is not None:
        text = step.content
    elif step.tool_calls:
        text = ""
    else:
        last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        text = "Echo: " + last_user[:_ECHO_CHARS]
    chunks = _WORD.findall(text) or ([text] if text else [])
    finish = "tool_calls" if step.tool_calls else "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not step.tool_calls and isinstance(limit, int) and len(chunks) > limit:
        chunks = chunks[:limit]
        if chunks:
            chunks[-1] = chunks[-1].rstrip()
        finish = "length"
    completion_tokens = step.completion_tokens
    if completion_tokens is None:
        completion_tokens = sum(len(chunk.split()) for chunk in chunks)
        completion_tokens += sum(len(call.arguments.split()) for call in step.tool_calls)
    return _Reply(chunks, step.tool_calls, finish, prompt_tokens, completion_tokens)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _pieces(arguments: str) -> list[str]:
    """Split tool-call arguments into stream pieces: at least two when there are two characters."""
    size = max(1, min(16, len(arguments) // 2))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


class _Dialect(Protocol):
    """One vendor's wire format."""

    malformed_frame: bytes

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool: ...

    def error(self, status: int, message: str, error_type: str | None = None, code: str | None = None) -> bytes: ...

    def context_error(self, prompt_tokens: int) -> bytes: ...

    def message(self, model: str, reply: _Reply) -> bytes: ...

    def frames(self, model: str, reply: _Reply, body: Mapping[str, Any]) -> list[_Frame]: ...


def _openai_error_kind(status: int) -> tuple[str, str | None]:
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 429:
        return "requests", "rate_limit_exceeded"
    return ("server_error" if status >= 500 else "invalid_request_error"), None


class _OpenAI:
    malformed_frame = b'data: {"id": "chatcmpl-malformed", "choices": [{"delta": {"content": \n\n'

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        return headers.get("Authorization") == "Bearer " + api_key

    def error(self, status: int, message: str, error_type: str | None = None, code: str | None = None) -> bytes:
        default_type, default_code = _openai_error_kind(status)
        error = {"message": message, "type": error_type or default_type, "param": None, "code": code or default_code}
        return orjson.dumps({"error": error})

    def context_error(self, prompt_tokens: int) -> bytes:
        message = (
            f"This model's maximum context length is 8192 tokens. However, your messages resulted in "
            f"{max(prompt_tokens, 8193)} tokens. Please reduce the length of the messages."
        )
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
        return orjson.dumps({"error": error})

    @staticmethod
    def _usage(reply: _Reply) -> dict[str, int]:
        total = reply.prompt_tokens + reply.completion_tokens
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": total,
        }

    def message(self, model: str, reply: _Reply) -> bytes:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if reply.tool_calls and not reply.chunks else reply.text,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": _new_id("call_"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in reply.tool_calls
            ]
        return orjson.dumps(
            {
                "id": _new_id("chatcmpl-"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
                "usage": self._usage(reply),
            }
        )

    def frames(self, model: str, reply: _Reply, body: Mapping[str, Any]) -> list[_Frame]:
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        head: dict[str, Any] = {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        if include_usage:
            head["usage"] = None
        deltas: list[dict[str, Any]] = [{"content": chunk} for chunk in reply.chunks]
        for index, call in enumerate(reply.tool_calls):
            function = {"name": call.name, "arguments": ""}
            deltas.append(
                {"tool_calls": [{"index": index, "id": _new_id("call_"), "type": "function", "function": function}]}
            )
            deltas.extend(
                {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                for piece in _pieces(call.arguments)
            )
        if not deltas:
            deltas.append({"content": ""})
        deltas[0] = {"role": "assistant", **deltas[0]}
        last = len(deltas) - 1
        frames: list[_Frame] = [
            (
                b"data: "
                + orjson.dumps(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": reply.finish if i == last else None,
                            }
                        ],
                    }
                )
                + b"\n\n",
                True,
            )
            for i, delta in enumerate(deltas)
        ]
        if include_usage:
            frames.append(
                (b"data: " + orjson.dumps({**head, "choices": [], "usage": self._usage(reply)}) + b"\n\n", False)
            )
        frames.append((b"data: [DONE]\n\n", False))
        return frames


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_ANTHROPIC_STOP_REASONS: Final = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_PING: Final = _event(b"ping", {"type": "ping"})


class _Anthropic:
    malformed_frame = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {\n\n'

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        # Recent anthropic SDKs send the key as a bearer token rather than x-api-key.
        return headers.get("x-api-key") == api_key or headers.get("Authorization") == "Bearer " + api_key

    def error(self, status: int, message: str, error_type: str | None = None, code: str | None = None) -> bytes:
        default_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": error_type or default_type, "message": message}})

    def context_error(self, prompt_tokens: int) -> bytes:
        message = f"prompt is too long: {max(prompt_tokens, 200_001)} tokens > 200000 maximum"
        return self.error(400, message)

    def message(self, model: str, reply: _Reply) -> bytes:
        content: list[dict[str, Any]] = []
        if reply.chunks or not reply.tool_calls:
            content.append({"type": "text", "text": reply.text})
        content.extend(
            {"type": "tool_use", "id": _new_id("toolu_"), "name": c.name, "input": c.input} for c in reply.tool_calls
        )
        return orjson.dumps(
            {
                "id": _new_id("msg_"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": _ANTHROPIC_STOP_REASONS[reply.finish],
                "stop_sequence": None,
                "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
            }
        )

    def frames(self, model: str, reply: _Reply, body: Mapping[str, Any]) -> list[_Frame]:
        message: dict[str, Any] = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1},
        }
        frames: list[_Frame] = [(_event(b"message_start", {"type": "message_start", "message": message}), False)]
        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        if reply.chunks or not reply.tool_calls:
            blocks.append(({"type": "text", "text": ""}, [{"type": "text_delta", "text": c} for c in reply.chunks]))
        for call in reply.tool_calls:
            block = {"type": "tool_use", "id": _new_id("toolu_"), "name": call.name, "input": {}}
            blocks.append((block, [{"type": "input_json_delta", "partial_json": p} for p in _pieces(call.arguments)]))
        for index, (block, deltas) in enumerate(blocks):
            start = {"type": "content_block_start", "index": index, "content_block": block}
            frames.append((_event(b"content_block_start", start), False))
            if index == 0:
                frames.append((_PING, False))
            frames.extend(
                (_event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}), True)
                for d in deltas
            )
            frames.append((_event(b"content_block_stop", {"type": "content_block_stop", "index": index}), False))
        delta = {"stop_reason": _ANTHROPIC_STOP_REASONS[reply.finish], "stop_sequence": None}
        usage = {"output_tokens": reply.completion_tokens}
        frames.append((_event(b"message_delta", {"type": "message_delta", "delta": delta, "usage": usage}), False))
        frames.append((_event(b"message_stop", {"type": "message_stop"}), False))
        return frames


_OPENAI: Final = _OpenAI()
_ANTHROPIC: Final = _Anthropic()


def _cut_index(frames: Sequence[_Frame], after: int) -> int:
    """Where a stream cut after ``after`` content chunks stops: before the next chunk, or before the closing events."""
    content = [i for i, (_, is_content) in enumerate(frames) if is_content]
    if after < len(content):
        return content[after]
    return content[-1] + 1 if content else len(frames) - 1


def _json(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _embedding(text: str, dims: int) -> list[float]:
    rng = random.Random(hashlib.blake2b(text.encode(), digest_size=16).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class FakeUpstream:
    """The fake upstream on the running event loop. See the module docstring for the routes and the step language."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        api_key: str | None = None,
        record: bool = True,
        delay_jitter_s: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.delay_s = delay_s
        # The default delay is drawn from [delay_s - jitter, delay_s + jitter] per request: a real model's answer
        # time varies, and a fixed one makes closed-loop clients arrive in lock-step bursts.
        self.delay_jitter_s = delay_jitter_s
        self._rng = random.Random(seed)
        self.chunk_delay_s = chunk_delay_s
        self.api_key = api_key
        self.record = record
        self.base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._queue: deque[_Step] = deque()
        self._model_queues: dict[str, deque[_Step]] = {}
        self._records: deque[dict[str, Any]] = deque(maxlen=_MAX_RECORDS)
        self._requests = 0
        self._by_path: dict[str, int] = {}
        self._active = 0
        self._active_streams = 0
        self._cancelled = 0
        self._cancelled_streams = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port); returns the base URL, e.g. ``http://127.0.0.1:9100``."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._chat_completions),
                web.post("/v1/messages", self._messages),
                web.post("/v1/embeddings", self._embeddings),
                web.get("/v1/models", self._models),
                web.post("/_fake/script", self._control_script),
                web.get("/_fake/requests", self._control_requests),
                web.post("/_fake/reset", self._control_reset),
                web.get("/_fake/stats", self._control_stats),
            ]
        )
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; requests still in flight are cancelled after a short grace period."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- scripting and inspection ----------------------------------------------------------------------------------

    def script(self, *steps: Mapping[str, Any], model: str | None = None) -> int:
        """Queue steps (for ``model``'s requests only, if given); returns how many were queued (``times`` counts)."""
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model must be a string, not {model!r}")
        parsed = [_parse_step(step) for step in steps]
        queue = self._queue if model is None else self._model_queues.setdefault(model, deque())
        for step, times in parsed:
            queue.extend(itertools.repeat(step, times))
        return sum(times for _, times in parsed)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The recorded API requests, oldest first: ``{"path", "headers", "body"}`` dicts."""
        return list(self._records)

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see the module docstring)."""
        return {
            "requests": self._requests,
            "by_path": dict(self._by_path),
            "active": self._active,
            "active_streams": self._active_streams,
            "cancelled": self._cancelled,
            "cancelled_streams": self._cancelled_streams,
            "queued": len(self._queue) + sum(len(q) for q in self._model_queues.values()),
        }

    def reset(self) -> None:
        """Empty the queues and the recorded requests; zero the counters (in-flight gauges excepted)."""
        self._queue.clear()
        self._model_queues.clear()
        self._records.clear()
        self._requests = 0
        self._by_path.clear()
        self._cancelled = 0
        self._cancelled_streams = 0

    # -- API routes ------------------------------------------------------------------------------------------------

    async def _receive(self, request: web.Request) -> Any:
        """Count and record an API request; returns its JSON body (the raw text if not JSON, None if empty)."""
        path = request.path
        self._requests += 1
        self._by_path[path] = self._by_path.get(path, 0) + 1
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
        if self.record:
            headers = {}
            for name, value in request.headers.items():
                key = name.lower()
                headers[key] = "***" if key in _SECRET_HEADERS else value
            self._records.append({"path": path, "headers": headers, "body": body})
        return body

    def _refusal(self, request: web.Request, dialect: _Dialect, body: Any) -> web.Response | None:
        """The error answer for a request that fails auth or is not a JSON object, else None."""
        if self.api_key is not None and not dialect.authorized(request.headers, self.api_key):
            return _json(401, dialect.error(401, "Incorrect or missing API key."))
        if not isinstance(body, dict):
            return _json(400, dialect.error(400, "The request body must be a JSON object."))
        return None

    def _next_step(self, model: str) -> _Step:
        queue = self._model_queues.get(model)
        if queue:
            return queue.popleft()
        if self._queue:
            return self._queue.popleft()
        return _DEFAULT_STEP

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, _OPENAI)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, _ANTHROPIC)

    async def _completion(self, request: web.Request, dialect: _Dialect) -> web.StreamResponse:
        body = await self._receive(request)
        refusal = self._refusal(request, dialect, body)
        if refusal is not None:
            return refusal
        model = body.get("model")
        model = model if isinstance(model, str) else ""
        step = self._next_step(model)
        self._active += 1
        try:
            return await self._answer(request, dialect, body, model, step)
        except asyncio.CancelledError:
            self._cancelled += 1
            raise
        finally:
            self._active -= 1

    async def _answer(
        self, request: web.Request, dialect: _Dialect, body: dict[str, Any], model: str, step: _Step
    ) -> web.StreamResponse:
        if step.delay_s is not None:
            delay = step.delay_s
        elif (asked := _asked_delay(body)) is not None:
            delay = asked
        elif self.delay_jitter_s:
            delay = max(0.0, self._rng.uniform(self.delay_s - self.delay_jitter_s, self.delay_s + self.delay_jitter_s))
        else:
            delay = self.delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if step.hang:
            await asyncio.Event().wait()
        if step.status is not None:
            message = step.message or f"Fake upstream error (status {step.status})."
            return _json(step.status, dialect.error(step.status, message, step.error_type, step.code), step.headers)
        reply = _reply(step, body)
        if step.context_length_exceeded:
            return _json(400, dialect.context_error(reply.prompt_tokens))
        if body.get("stream"):
            return await self._stream(request, dialect, dialect.frames(model, reply, body), step)
        if step.malformed:
            return _json(200, _MALFORMED_BODY, step.headers)
        return _json(200, dialect.message(model, reply), step.headers)

    async def _stream(
        self, request: web.Request, dialect: _Dialect, frames: list[_Frame], step: _Step
    ) -> web.StreamResponse:
        if step.malformed:
            first_content = next((i for i, (_, is_content) in enumerate(frames) if is_content), 0)
            frames.insert(first_content + 1, (dialect.malformed_frame, False))
        cut_at = -1 if step.cut_after_chunks is None else _cut_index(frames, step.cut_after_chunks)
        if step.end_after_chunks is not None:
            del frames[_cut_index(frames, step.end_after_chunks) :]
        gap = self.chunk_delay_s if step.chunk_delay_s is None else step.chunk_delay_s
        response = web.StreamResponse(headers={**_SSE_HEADERS, **(step.headers or {})})
        await response.prepare(request)
        self._active_streams += 1
        try:
            pending: list[bytes] = []
            seen_content = False
            for i, (frame, is_content) in enumerate(frames):
                if i == cut_at:
                    if pending:
                        await response.write(b"".join(pending))
                    if request.transport is not None:
                        request.transport.close()  # no terminating chunk: the client sees a broken body
                    return response
                pause = step.first_chunk_delay_s if i == 0 else gap if is_content and seen_content else 0.0
                if pause > 0:
                    if pending:
                        await response.write(b"".join(pending))
                        pending.clear()
                    await asyncio.sleep(pause)
                seen_content = seen_content or is_content
                pending.append(frame)
            await response.write_eof(b"".join(pending))  # one write with the terminating chunk
        except ConnectionError:  # the client went away while we were writing
            self._cancelled += 1
            self._cancelled_streams += 1
        except asyncio.CancelledError:  # the client went away while we were waiting (or the server is stopping)
            self._cancelled_streams += 1
            raise
        finally:
            self._active_streams -= 1
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        refusal = self._refusal(request, _OPENAI, body)
        if refusal is not None:
            return refusal
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return _json(400, _OPENAI.error(400, "'input' must be a non-empty string or list of strings."))
        texts = [item if isinstance(item, str) else orjson.dumps(item).decode() for item in inputs]
        dims = body.get("dimensions") or _EMBEDDING_DIMS
        if not isinstance(dims, int) or dims < 1:
            return _json(400, _OPENAI.error(400, "'dimensions' must be a positive integer."))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(text, dims)
            embedding: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = max(1, sum(len(text.split()) for text in texts))
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json(200, orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage}))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        if self.api_key is not None and not _OPENAI.authorized(request.headers, self.api_key):
            return _json(401, _OPENAI.error(401, "Incorrect or missing API key."))
        names = dict.fromkeys((_DEFAULT_MODEL, *self._model_queues))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "keel-fake"} for name in names]
        return _json(200, orjson.dumps({"object": "list", "data": data}))

    # -- control routes --------------------------------------------------------------------------------------------

    async def _control_script(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = orjson.loads(await request.read())
            if not isinstance(payload, dict) or not isinstance(payload.get("steps"), list):
                raise ValueError('expected {"steps": [...], "model": optional string}')
            queued = self.script(*payload["steps"], model=payload.get("model"))
        except (TypeError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            return _json(400, orjson.dumps({"error": str(exc)}))
        return _json(200, orjson.dumps({"queued": queued}))

    async def _control_requests(self, request: web.Request) -> web.StreamResponse:
        return _json(200, orjson.dumps(self.requests))

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json(200, b'{"ok": true}')

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(200, orjson.dumps(self.stats))


class FakeUpstreamThread:
    """A :class:`FakeUpstream` serving from its own event loop in a daemon thread; every method is thread-safe."""

    def __init__(self, **options: Any) -> None:
        """``options`` are :class:`FakeUpstream`'s."""
        self._upstream = FakeUpstream(**options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the thread and listen; returns the base URL once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, args=(host, port, ready), name="fake-upstream", daemon=True)
        self._thread.start()
        try:
            self.base_url = ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self.base_url

    def _run(self, host: str, port: int, ready: Future[str]) -> None:
        with asyncio.Runner() as runner:
            runner.run(self._serve(host, port, ready))

    async def _serve(self, host: str, port: int, ready: Future[str]) -> None:
        stopping = asyncio.Event()
        try:
            url = await self._upstream.start(host, port)
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            ready.set_exception(exc)
            return
        self._loop, self._stopping = asyncio.get_running_loop(), stopping
        ready.set_result(url)
        try:
            await stopping.wait()
        finally:
            await self._upstream.stop()

    def stop(self) -> None:
        """Stop the server and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join()
        self._loop = None

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server's loop (or right here before it starts) and return its result."""
        loop = self._loop
        if loop is None:
            return fn()

        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def script(self, *steps: Mapping[str, Any], model: str | None = None) -> int:
        """See :meth:`FakeUpstream.script`."""
        return self._call(lambda: self._upstream.script(*steps, model=model))

    @property
    def requests(self) -> list[dict[str, Any]]:
        """See :attr:`FakeUpstream.requests`."""
        return self._call(lambda: self._upstream.requests)

    @property
    def stats(self) -> dict[str, Any]:
        """See :attr:`FakeUpstream.stats`."""
        return self._call(lambda: self._upstream.stats)

    def reset(self) -> None:
        """See :meth:`FakeUpstream.reset`."""
        self._call(self._upstream.reset)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _serve_until_signalled(upstream: FakeUpstream, host: str, port: int) -> None:
    url = await upstream.start(host, port)
    print(f"fake upstream listening on {url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await upstream.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m keel.testing.fake_upstream``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m keel.testing.fake_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port (printed on startup)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="default wait before response headers")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="default wait between stream chunks")
    parser.add_argument("--delay-jitter-s", type=float, default=0.0, help="draw each delay from delay ± this")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jittered delays")
    parser.add_argument("--api-key", default=None, help="require this key (Bearer / x-api-key)")
    parser.add_argument("--no-record", action="store_true", help="do not record requests for /_fake/requests")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(
        delay_s=args.delay_s,
        chunk_delay_s=args.chunk_delay_s,
        api_key=args.api_key,
        record=not args.no_record,
        delay_jitter_s=args.delay_jitter_s,
        seed=args.seed,
    )
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional: it only makes the fake faster
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_until_signalled(upstream, args.host, args.port))


if __name__ == "__main__":
    main()
