"""The Anthropic Messages wire interface (``POST {api_base}/v1/messages``, ``anthropic-version: 2023-06-01``).

Clients keep speaking OpenAI chat-completions; this module translates both ways with pure functions
(:func:`to_anthropic_request`, :func:`from_anthropic_response`, :class:`StreamTranslator`).

Request (OpenAI → Anthropic):

- ``system``/``developer`` messages, wherever they appear, are joined with blank lines into the top-level
  ``system``. ``user`` text and ``image_url`` parts become ``text``/``image`` blocks (``data:…;base64,`` URLs →
  base64 source, ``http(s)`` URLs → url source; ``detail`` is dropped). Assistant ``tool_calls`` become
  ``tool_use`` blocks (arguments must be a JSON object), ``tool`` messages become ``tool_result`` blocks in a user
  turn, and consecutive turns of the same role are merged because Anthropic requires alternation. Empty text is
  dropped (Anthropic rejects empty text blocks); a message's ``name`` is dropped.
- ``tools`` (function type) → ``tools`` with ``input_schema``; ``tool_choice`` auto/none/required/function →
  auto/none/any/tool (auto is Anthropic's default and is omitted; ``tool_choice`` is dropped when there are no
  tools); ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.
- ``max_completion_tokens`` or ``max_tokens`` → ``max_tokens`` (required upstream; default 4096). ``temperature``
  is clamped to Anthropic's 0-1 range; ``top_p``, ``top_k`` pass through; ``stop`` → ``stop_sequences``;
  ``user`` → ``metadata.user_id``.
- ``response_format`` json_object/json_schema: this API version has no structured output, so an instruction to
  answer with JSON only (quoting the schema) is appended to ``system``. The output is not validated.
- Dropped as harmless hints: ``seed``, ``presence_penalty``, ``frequency_penalty``, ``service_tier``, ``store``,
  ``metadata``, ``prediction``, ``reasoning_effort``, ``verbosity``, ``prompt_cache_key``, ``safety_identifier``,
  ``stream_options`` (read by :meth:`AnthropicProvider.stream`). Rejected with ``InvalidRequest`` naming the
  parameter, because ignoring them would change what the client gets: ``n`` > 1, ``logprobs``, ``top_logprobs``,
  non-empty ``logit_bias`` (OpenAI token ids mean nothing to Claude), ``audio``/non-text ``modalities``, legacy
  ``functions``/``function_call``, and any parameter not listed here.

Response (Anthropic → OpenAI): text blocks are concatenated into ``content``, ``tool_use`` blocks become
``tool_calls`` (arguments as a JSON string), other blocks are ignored. ``stop_reason`` end_turn/stop_sequence/
pause_turn → stop, max_tokens/model_context_window_exceeded → length, tool_use → tool_calls, refusal →
content_filter. ``prompt_tokens`` counts cache reads and writes too; cache reads are reported as
``prompt_tokens_details.cached_tokens``.

Streams: ``message_start`` → a role chunk, text deltas → ``content``, a ``tool_use`` block → a tool-call delta
(index counts tool blocks only) followed by its argument fragments (``"{}"`` when the tool got none),
``message_delta`` → the finish chunk, ``message_stop`` → the usage chunk when ``stream_options.include_usage``.
An ``error`` event raises the ``ProviderError`` its type maps to (overloaded → ``UpstreamError``, rate limit →
``RateLimited``, …) and a body that ends before ``message_stop`` raises ``UpstreamError``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from keel.config import DEFAULT_API_BASES, Deployment
from keel.errors import InvalidRequest, ProviderError, UpstreamError
from keel.llm.base import ProviderInfo, Timeouts
from keel.llm.client import Response, UpstreamClient
from keel.llm.http import error_from_response, iter_sse, read_json, upstream_request

__all__ = ["AnthropicProvider", "StreamTranslator", "from_anthropic_response", "to_anthropic_request"]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

_TRANSLATED = frozenset({
    "model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
    "user", "tools", "tool_choice", "parallel_tool_calls", "response_format"
})  # fmt: skip
_DROPPED = frozenset({
    "seed", "presence_penalty", "frequency_penalty", "service_tier", "store", "metadata", "prediction",
    "reasoning_effort", "verbosity", "prompt_cache_key", "safety_identifier", "stream_options"
})  # fmt: skip
# Values of otherwise unsupported parameters that ask for nothing Anthropic cannot do.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "modalities": (["text"],),
}
_HINTS = {
    "n": "; send n separate requests instead",
    "functions": "; use tools instead",
    "function_call": "; use tool_choice instead",
}
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# The HTTP status Anthropic answers each error type with, so a mid-stream ``error`` event is classified exactly
# like the same error arriving as a response status.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.+)", re.DOTALL)
_JSON_ONLY = "Respond with a single JSON value and nothing else: no prose, no Markdown code fences."


# -- request ---------------------------------------------------------------------------------------------------


def to_anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions body as an Anthropic Messages body (without ``stream``).

    Raises ``InvalidRequest`` (with ``param``) for what Anthropic cannot honour; see the module docstring.
    """
    _check_parameters(body)
    if not isinstance(body.get("model"), str):
        raise InvalidRequest("model is required", param="model")
    system, messages = _messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        "messages": messages,
    }
    instruction = _format_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if system:
        out["system"] = "\n\n".join(system)
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0) if isinstance(temperature, int | float) else temperature
    for key in ("top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("user") is not None:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice != {"type": "auto"}:
            out["tool_choice"] = choice
    return out


def _check_parameters(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if value is None or key in _TRANSLATED or key in _DROPPED or value in _NEUTRAL.get(key, ()):
            continue
        raise InvalidRequest(
            f"Parameter {key!r} is not supported for models served by Anthropic{_HINTS.get(key, '')}", param=key
        )


def _messages(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, alternating Anthropic turns) from OpenAI ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_text(msg.get("content"), where))
            continue
        if role == "user":
            blocks = _user_blocks(msg.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(msg, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(msg, where)]
        else:
            raise InvalidRequest(f"{where}.role {role!r} is not supported", param=f"{where}.role")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise InvalidRequest("messages must include at least one user or assistant message", param="messages")
    return system, turns


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI message content as a list of content parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise InvalidRequest(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")


def _text(content: Any, where: str) -> str:
    """The text of content that may only hold text parts (system, developer and tool messages)."""
    texts = []
    for j, part in enumerate(_parts(content, where)):
        if part.get("type") != "text":
            raise _bad_part(part, f"{where}.content[{j}]")
        texts.append(str(part.get("text", "")))
    return "\n\n".join(texts)


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    blocks = []
    for j, part in enumerate(_parts(content, where)):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}.content[{j}]"))
        else:
            raise _bad_part(part, f"{where}.content[{j}]")
    return blocks


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if isinstance(url, str):
        if match := _DATA_URL.fullmatch(url):
            return {"type": "image", "source": {"type": "base64", "media_type": match[1], "data": match[2]}}
        if url.startswith(("https://", "http://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(
        f"{where}.image_url.url must be an http(s) URL or a base64 data URL (data:image/png;base64,...)",
        param=f"{where}.image_url.url",
    )


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = []
    for j, part in enumerate(_parts(msg.get("content"), where)):
        kind = part.get("type")
        if kind not in ("text", "refusal"):
            raise _bad_part(part, f"{where}.content[{j}]")
        if part.get(kind):
            blocks.append({"type": "text", "text": part[kind]})
    for j, call in enumerate(msg.get("tool_calls") or []):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise InvalidRequest(f"{at} must be a function tool call", param=at)
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"{at}.function.arguments must be a JSON object encoded as a string", param=f"{at}.function.arguments"
            )
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments})
    return blocks


def _tool_result(msg: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(msg.get("tool_call_id"), str):
        raise InvalidRequest(f"{where}.tool_call_id is required for tool messages", param=f"{where}.tool_call_id")
    return {"type": "tool_result", "tool_use_id": msg["tool_call_id"], "content": _text(msg.get("content"), where)}


def _bad_part(part: dict[str, Any], where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: content part type {part.get('type')!r} is not supported here for models served by Anthropic",
        param=f"{where}.type",
    )


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
        entry: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel_tool_calls: Any) -> dict[str, Any]:
    if choice == "none":
        return {"type": "none"}
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(name := (choice.get("function") or {}).get("name"), str):
        out = {"type": "tool", "name": name}
    else:
        raise InvalidRequest(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    return out


def _format_instruction(response_format: Any) -> str | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _JSON_ONLY
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            return _JSON_ONLY
        return f"{_JSON_ONLY} It must validate against this JSON Schema:\n{orjson.dumps(schema).decode()}"
    raise InvalidRequest(
        "response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format.type"
    )


# -- response --------------------------------------------------------------------------------------------------


def from_anthropic_response(data: dict[str, Any], model: str) -> dict[str, Any]:
    """An Anthropic ``message`` as an OpenAI ``chat.completion``; ``model`` is used when ``data`` names none."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": data.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish_reason(data.get("stop_reason")), "logprobs": None}
        ],
        "usage": _openai_usage(data.get("usage") or {}),
    }


def _finish_reason(stop_reason: str | None) -> str:
    """OpenAI ``finish_reason`` for an Anthropic ``stop_reason`` (unknown ones count as a normal stop)."""
    return _FINISH.get(stop_reason or "", "stop")


def _openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI ``usage`` from Anthropic's, where ``input_tokens`` excludes cache reads and writes."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _stream_error(event: dict[str, Any], deployment: str) -> ProviderError:
    """The ``ProviderError`` for an Anthropic ``error`` event, classified as the same error sent as a status."""
    error = event.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    status = _ERROR_STATUS.get(kind or "", 500)
    return error_from_response(status, orjson.dumps(event), {}, deployment)


class StreamTranslator:
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` dicts out; one instance per stream.

    :meth:`feed` returns the chunks for one event (often none) and raises the matching ``ProviderError`` for an
    ``error`` event; ``done`` turns true at ``message_stop``.
    """

    def __init__(self, model: str, *, deployment: str, include_usage: bool) -> None:
        self.model = model
        self.deployment = deployment
        self.include_usage = include_usage
        self.id = ""
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.done = False
        self._tool_index: dict[int, int] = {}  # Anthropic content block index → OpenAI tool_calls index
        self._with_arguments: set[int] = set()  # tool blocks that streamed some argument text

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        index = event.get("index")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = message.get("id") or self.id
            self.model = message.get("model") or self.model
            self.usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start" and isinstance(index, int):
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                self._tool_index[index] = len(self._tool_index)
                call = {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._tool_chunk(index, call)]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json") and index in self._tool_index:
                self._with_arguments.add(index)
                return [self._tool_chunk(index, {"function": {"arguments": delta["partial_json"]}})]
        elif kind == "content_block_stop" and index in self._tool_index and index not in self._with_arguments:
            return [self._tool_chunk(index, {"function": {"arguments": "{}"}})]
        elif kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, _finish_reason(stop_reason))]
        elif kind == "message_stop":
            self.done = True
            if self.include_usage:
                return [{**self._base(), "choices": [], "usage": _openai_usage(self.usage)}]
        elif kind == "error":
            raise _stream_error(event, self.deployment)
        return []  # ping, thinking and citation deltas, and event types added after this was written

    def _base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def _tool_chunk(self, index: int, call: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": self._tool_index[index], **call}]})


# -- provider --------------------------------------------------------------------------------------------------


class AnthropicProvider:
    """A deployment reached over Anthropic's Messages API."""

    def __init__(self, deployment: Deployment, client: UpstreamClient) -> None:
        self.deployment = deployment
        self.info = ProviderInfo(
            interface="anthropic", model=deployment.model, context_window=deployment.context_window
        )
        self._client = client
        self._url = f"{deployment.api_base or DEFAULT_API_BASES['anthropic']}/v1/messages"
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        self._headers = {**headers, **deployment.extra_headers}  # extra headers may override, e.g. the version

    def _post(self, payload: dict[str, Any], timeouts: Timeouts) -> AbstractAsyncContextManager[Response]:
        return upstream_request(
            self._client,
            "POST",
            self._url,
            deployment=self.deployment.id,
            json_body=payload,
            headers=self._headers,
            connect_timeout=timeouts.connect,
        )

    async def complete(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        did = self.deployment.id
        async with self._post(to_anthropic_request(body), timeouts) as resp:
            data = await read_json(resp, did)
        if data.get("type") != "message":
            raise UpstreamError(f"upstream {did} sent something other than a message", deployment=did)
        return from_anthropic_response(data, body["model"])

    async def stream(self, body: dict[str, Any], timeouts: Timeouts) -> AsyncIterator[dict[str, Any]]:
        did = self.deployment.id
        payload = {**to_anthropic_request(body), "stream": True}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        translator = StreamTranslator(body["model"], deployment=did, include_usage=include_usage)
        async with self._post(payload, timeouts) as resp:
            async for _, data in iter_sse(resp, did):
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamError(
                        f"upstream {did} sent a malformed event: {data[:120]!r}", deployment=did
                    ) from exc
                if not isinstance(event, dict):
                    raise UpstreamError(f"upstream {did} sent an event that is not an object", deployment=did)
                for chunk in translator.feed(event):
                    yield chunk
                if translator.done:
                    return
        raise UpstreamError(f"upstream {did} ended the stream before message_stop", deployment=did)

    async def embed(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        raise InvalidRequest(
            "Anthropic has no embeddings API; route embeddings to an OpenAI-compatible model", param="model"
        )

    async def ready(self) -> tuple[bool, str]:
        return (True, "configured") if self.deployment.api_key else (False, "no api_key")

    async def aclose(self) -> None:
        """Nothing to release: the connection pool is shared and owned by the app."""
