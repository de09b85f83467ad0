"""The Anthropic wire interface: translation both ways, and the provider against a scripted fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from keel.config import Deployment
from keel.errors import (
    ContextWindowExceeded,
    InvalidRequest,
    ProviderError,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
)
from keel.llm.anthropic import AnthropicProvider, StreamTranslator, from_anthropic_response, to_anthropic_request
from keel.llm.base import Timeouts
from keel.llm.client import UpstreamClient
from keel.testing.fake_upstream import FakeUpstream

MODEL = "claude-test"


def req(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return to_anthropic_request({"model": MODEL, "messages": list(messages), **params})


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


# -- request ---------------------------------------------------------------------------------------------------


def test_minimal_request_defaults_max_tokens() -> None:
    assert req(user("hi")) == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [text("hi")]}],
    }


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert req(user("hi"), max_tokens=10)["max_tokens"] == 10
    assert req(user("hi"), max_tokens=10, max_completion_tokens=20)["max_tokens"] == 20


def test_system_and_developer_messages_are_joined_into_system() -> None:
    out = req(
        {"role": "system", "content": "Be brief."},
        user("hi"),
        {"role": "developer", "content": [text("Use French."), text("No emoji.")]},
    )
    assert out["system"] == "Be brief.\n\nUse French.\n\nNo emoji."
    assert out["messages"] == [{"role": "user", "content": [text("hi")]}]


def test_sampling_stop_and_user() -> None:
    out = req(user("hi"), temperature=1.5, top_p=0.9, stop="END", user="u-1", seed=7, presence_penalty=0.5)
    assert out["temperature"] == 1.0  # clamped to Anthropic's range
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-1"}
    assert "seed" not in out and "presence_penalty" not in out
    assert req(user("hi"), stop=["a", "b"], temperature=0.2)["stop_sequences"] == ["a", "b"]
    assert req(user("hi"), temperature=0.2)["temperature"] == 0.2


def test_image_parts() -> None:
    out = req(
        user(
            [
                text("what is this?"),
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]
        )
    )
    assert out["messages"][0]["content"] == [
        text("what is this?"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_image_with_unusable_url_is_rejected() -> None:
    with pytest.raises(InvalidRequest) as exc:
        req(user([{"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}}]))
    assert exc.value.param == "messages[0].content[0].image_url.url"


def test_tool_round_trip_and_alternation_merge() -> None:
    out = req(
        user("weather in Paris and Rome?"),
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [text("21C")]},
        user("thanks, and London?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "weather", "arguments": ""}},
        ]},
    )  # fmt: skip
    assert out["messages"] == [
        {"role": "user", "content": [text("weather in Paris and Rome?")]},
        {
            "role": "assistant",
            "content": [
                text("Checking."),
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "21C"},
                text("thanks, and London?"),
            ],
        },
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_3", "name": "weather", "input": {}}]},
    ]


def test_consecutive_user_messages_are_merged() -> None:
    out = req(user("one"), user([text("two")]), user(""))
    assert out["messages"] == [{"role": "user", "content": [text("one"), text("two")]}]


def test_invalid_tool_arguments_are_rejected() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(InvalidRequest) as exc:
        req(user("hi"), {"role": "assistant", "tool_calls": [call]})
    assert exc.value.param == "messages[1].tool_calls[0].function.arguments"


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}


def test_tools() -> None:
    out = req(user("hi"), tools=[WEATHER, {"type": "function", "function": {"name": "now"}}])
    assert out["tools"] == [
        {"name": "weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out  # auto is Anthropic's default
    assert req(user("hi"), tools=[WEATHER], parallel_tool_calls=False)["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert "tool_choice" not in req(user("hi"), tool_choice="none")  # no tools: nothing to choose


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", None),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any] | None) -> None:
    assert req(user("hi"), tools=[WEATHER], tool_choice=choice).get("tool_choice") == expected


def test_response_format_becomes_a_system_instruction() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    out = req(
        {"role": "system", "content": "Be brief."},
        user("hi"),
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    first, instruction = out["system"].split("\n\n")
    assert first == "Be brief."
    assert "JSON" in instruction and orjson.dumps(schema).decode() in instruction
    assert "JSON" in req(user("hi"), response_format={"type": "json_object"})["system"]
    assert "system" not in req(user("hi"), response_format={"type": "text"})


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"frobnicate": True}, "frobnicate"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ],
)
def test_unsupported_parameters_are_rejected(params: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        req(user("hi"), **params)
    assert exc.value.param == param
    assert param.split("[")[0] in exc.value.message


def test_neutral_values_of_unsupported_parameters_pass() -> None:
    out = req(user("hi"), n=1, logprobs=False, logit_bias={}, modalities=["text"], stream_options=None)
    assert set(out) == {"model", "max_tokens", "messages"}


def test_unsupported_content_and_roles_are_rejected() -> None:
    with pytest.raises(InvalidRequest) as exc:
        req(user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]))
    assert exc.value.param == "messages[0].content[0].type"
    with pytest.raises(InvalidRequest) as exc:
        req({"role": "function", "name": "f", "content": "x"})
    assert exc.value.param == "messages[0].role"
    with pytest.raises(InvalidRequest) as exc:
        req({"role": "system", "content": "only a system prompt"})
    assert exc.value.param == "messages"


# -- response --------------------------------------------------------------------------------------------------


def message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-upstream-20250101",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_text_response() -> None:
    out = from_anthropic_response(message([text("Hello"), text(" there")]), MODEL)
    assert out["id"] == "msg_01abc"
    assert out["object"] == "chat.completion"
    assert isinstance(out["created"], int)
    assert out["model"] == "claude-upstream-20250101"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_tool_use_response() -> None:
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
    out = from_anthropic_response(message([tool_use], "tool_use"), MODEL)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_1" and call["type"] == "function" and call["function"]["name"] == "weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_finish_reasons(stop_reason: str, finish: str) -> None:
    assert from_anthropic_response(message([text("x")], stop_reason), MODEL)["choices"][0]["finish_reason"] == finish


def test_usage_counts_cache_tokens_as_prompt_tokens() -> None:
    data = message([text("x")], cache_read_input_tokens=100, cache_creation_input_tokens=20)
    assert from_anthropic_response(data, MODEL)["usage"] == {
        "prompt_tokens": 130,
        "completion_tokens": 5,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


# -- stream translation ----------------------------------------------------------------------------------------


def feed_all(translator: StreamTranslator, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for event in events for chunk in translator.feed(event)]


def tool_start(index: int, id_: str, name: str) -> dict[str, Any]:
    block = {"type": "tool_use", "id": id_, "name": name, "input": {}}
    return {"type": "content_block_start", "index": index, "content_block": block}


def new_call(index: int, id_: str, name: str) -> dict[str, Any]:
    return {
        "tool_calls": [{"index": index, "id": id_, "type": "function", "function": {"name": name, "arguments": ""}}]
    }


START = {
    "type": "message_start",
    "message": {"id": "msg_1", "model": "claude-upstream", "usage": {"input_tokens": 12, "cache_read_input_tokens": 3}},
}
TOOL_EVENTS = [
    START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}},
    {"type": "content_block_stop", "index": 0},
    tool_start(1, "toolu_a", "weather"),
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
    {"type": "content_block_stop", "index": 1},
    tool_start(2, "toolu_b", "now"),
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}},
    {"type": "message_stop"},
]  # fmt: skip


def test_stream_translation_of_text_and_tools() -> None:
    translator = StreamTranslator(MODEL, deployment="d", include_usage=True)
    chunks = feed_all(translator, TOOL_EVENTS)
    assert translator.done
    assert all(c["id"] == "msg_1" and c["model"] == "claude-upstream" for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Let me check."},
        new_call(0, "toolu_a", "weather"),
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        new_call(1, "toolu_b", "now"),
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]  # fmt: skip
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 7 + ["tool_calls"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 30,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def test_stream_usage_chunk_only_when_asked() -> None:
    chunks = feed_all(StreamTranslator(MODEL, deployment="d", include_usage=False), TOOL_EVENTS)
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(
    ("error_type", "message", "expected"),
    [
        ("overloaded_error", "Overloaded", UpstreamError),
        ("api_error", "Internal server error", UpstreamError),
        ("rate_limit_error", "Slow down", RateLimited),
        ("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum", ContextWindowExceeded),
        ("invalid_request_error", "bad request", UpstreamRejected),
    ],
)
def test_stream_error_event_raises_the_matching_error(
    error_type: str, message: str, expected: type[ProviderError]
) -> None:
    translator = StreamTranslator(MODEL, deployment="d", include_usage=True)
    translator.feed(START)
    with pytest.raises(expected) as exc:
        translator.feed({"type": "error", "error": {"type": error_type, "message": message}})
    assert type(exc.value) is expected
    assert exc.value.deployment == "d"
    assert message in exc.value.message


# -- the provider against the fake upstream --------------------------------------------------------------------

API_KEY = "sk-ant-test"
TIMEOUTS = Timeouts()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(api_key=API_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def provider(upstream: FakeUpstream) -> AsyncIterator[AnthropicProvider]:
    deployment = Deployment(
        id="claude#0",
        public_name="claude",
        provider="anthropic",
        model=MODEL,
        api_base=upstream.base_url,
        api_key=API_KEY,
        extra_headers={"anthropic-beta": "test-beta"},
    )
    client = UpstreamClient()
    yield AnthropicProvider(deployment, client)
    await client.aclose()


def chat(*messages: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages), **params}


def streamed(*messages: dict[str, Any], include_usage: bool = True, **params: Any) -> dict[str, Any]:
    return chat(*messages, stream=True, stream_options={"include_usage": include_usage}, **params)


async def collect(provider: AnthropicProvider, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [chunk async for chunk in provider.stream(body, TIMEOUTS)]


async def drain(stream: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    """Append a stream's chunks to ``into`` as they arrive, so a test still sees them when the stream raises."""
    async for chunk in stream:
        into.append(chunk)  # noqa: PERF401 (a comprehension would lose the chunks before an error)


def assemble(chunks: list[dict[str, Any]]) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    """(content, tool calls by index, finish_reason) the way an OpenAI client rebuilds them from chunks."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += call.get("function", {}).get("name") or ""
                slot["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content, calls, finish


async def test_info_ready_and_embed(provider: AnthropicProvider) -> None:
    assert provider.info.interface == "anthropic" and provider.info.model == MODEL
    assert await provider.ready() == (True, "configured")
    with pytest.raises(InvalidRequest) as exc:
        await provider.embed({"model": MODEL, "input": "hi"}, TIMEOUTS)
    assert exc.value.param == "model"
    keyless = AnthropicProvider(provider.deployment.model_copy(update={"api_key": None}), UpstreamClient())
    assert await keyless.ready() == (False, "no api_key")


async def test_complete(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    body = chat({"role": "system", "content": "Be brief."}, user("hello there"), max_tokens=50)
    out = await provider.complete(body, TIMEOUTS)
    assert out["object"] == "chat.completion" and out["id"].startswith("msg_")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Echo: hello there"}
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 3
    [record] = upstream.requests
    assert record["path"] == "/v1/messages"
    assert record["body"] == to_anthropic_request(body)
    assert record["headers"]["anthropic-version"] == "2023-06-01"
    assert record["headers"]["anthropic-beta"] == "test-beta"
    assert record["headers"]["x-api-key"] == "***"  # sent (and accepted: the fake checks it)


async def test_complete_tool_round_trip(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    upstream.script({"tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]})
    question = user("weather in Paris?")
    out = await provider.complete(chat(question, tools=[WEATHER]), TIMEOUTS)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}

    result = {"role": "tool", "tool_call_id": call["id"], "content": "18C"}
    follow_up = await provider.complete(chat(question, choice["message"], result, tools=[WEATHER]), TIMEOUTS)
    assert follow_up["choices"][0]["message"]["content"] == "Echo: 18C"
    sent = upstream.requests[-1]["body"]["messages"]
    assert sent[1]["content"] == [{"type": "tool_use", "id": call["id"], "name": "weather", "input": {"city": "Paris"}}]
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "18C"}],
    }


async def test_stream_text(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    chunks = await collect(provider, streamed(user("one two three")))
    assert upstream.requests[0]["body"]["stream"] is True
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1
    content, calls, finish = assemble(chunks)
    assert (content, calls, finish) == ("Echo: one two three", {}, "stop")
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_stream_tool_use_reassembles_arguments(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    arguments = {"city": "Paris", "days": 3, "units": "metric"}
    upstream.script({"tool_calls": [{"name": "weather", "arguments": arguments}, {"name": "now", "arguments": {}}]})
    chunks = await collect(provider, streamed(user("weather?"), tools=[WEATHER]))
    _, calls, finish = assemble(chunks)
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["weather", "now"]
    assert all(call["id"].startswith("toolu_") for call in calls.values())
    assert orjson.loads(calls[0]["arguments"]) == arguments
    assert orjson.loads(calls[1]["arguments"]) == {}
    fragments = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(fragments) > 3  # the arguments really arrived in pieces


async def test_usage_chunk_only_when_asked(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, streamed(user("hi"), include_usage=False))
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert assemble(chunks)[2] == "stop"


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"status": 529}, UpstreamError),
        ({"status": 500}, UpstreamError),
        ({"status": 429, "retry_after": 2}, RateLimited),
        ({"status": 400, "message": "prompt is too long"}, ContextWindowExceeded),
        ({"context_length_exceeded": True}, ContextWindowExceeded),
        ({"status": 400, "message": "messages: roles must alternate"}, UpstreamRejected),
    ],
)
async def test_upstream_errors(
    provider: AnthropicProvider, upstream: FakeUpstream, step: dict[str, Any], expected: type[ProviderError]
) -> None:
    upstream.script({**step, "times": 2})
    with pytest.raises(expected) as exc:
        await provider.complete(chat(user("hi")), TIMEOUTS)
    assert type(exc.value) is expected and exc.value.deployment == "claude#0"
    if expected is RateLimited:
        assert exc.value.retry_after == 2
    chunks: list[dict[str, Any]] = []
    with pytest.raises(expected):
        await drain(provider.stream(streamed(user("hi")), TIMEOUTS), chunks)
    assert chunks == []  # raised from the first __anext__


async def test_cut_stream_raises_mid_iteration(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    upstream.script({"cut_after_chunks": 2})
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError):
        await drain(provider.stream(streamed(user("a b c d e f")), TIMEOUTS), chunks)
    content, _, finish = assemble(chunks)
    assert content == "Echo: a "  # the role chunk and two content chunks came through first
    assert finish is None and all(c["choices"] for c in chunks)


async def test_malformed_event_raises(provider: AnthropicProvider, upstream: FakeUpstream) -> None:
    upstream.script({"malformed": True})
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(provider, streamed(user("a b c")))


async def test_invalid_request_is_raised_before_calling_upstream(
    provider: AnthropicProvider, upstream: FakeUpstream
) -> None:
    with pytest.raises(InvalidRequest):
        await collect(provider, streamed(user("hi"), n=3))
    with pytest.raises(InvalidRequest):
        await provider.complete(chat(user("hi"), logprobs=True), TIMEOUTS)
    assert upstream.requests == []


async def test_cancelling_the_consumer_closes_the_upstream_stream(
    provider: AnthropicProvider, upstream: FakeUpstream
) -> None:
    upstream.script({"chunk_delay_s": 0.2})
    received: list[dict[str, Any]] = []
    streaming = asyncio.Event()

    async def consume() -> None:
        async for chunk in provider.stream(streamed(user(" ".join(["word"] * 50))), TIMEOUTS):
            received.append(chunk)
            if len(received) == 3:
                streaming.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the fake notices the closed connection on its next write
        if upstream.stats["cancelled_streams"]:
            break
        await asyncio.sleep(0.01)
    assert upstream.stats["cancelled_streams"] == 1 and upstream.stats["active_streams"] == 0
    assert len(received) < 10
