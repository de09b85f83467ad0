"""The fake upstream, exercised over real HTTP with the official openai/anthropic SDKs and raw aiohttp."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

import keel
from keel.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

USER: list[Any] = [{"role": "user", "content": "hello brave new world"}]


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh(fake: FakeUpstream) -> None:
    fake.reset()


@pytest.fixture
def oai(fake: FakeUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{fake.base_url}/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
def claude(fake: FakeUpstream) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="sk-ant-test", max_retries=0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _eventually(predicate: Any, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- OpenAI chat completions ---------------------------------------------------------------------------------------


async def test_openai_non_stream_echoes_last_user_message(oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]},
    ]
    completion = await oai.chat.completions.create(model="gpt-x", messages=messages)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-x"
    assert completion.system_fingerprint is None
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: hello world"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (8, 3)
    assert completion.usage.total_tokens == 11


async def test_openai_echo_is_truncated_to_200_chars(oai: openai.AsyncOpenAI) -> None:
    long = "x" * 500
    completion = await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": long}])
    assert completion.choices[0].message.content == "Echo: " + "x" * 200


async def test_openai_stream_without_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 5  # one per word, no usage chunk
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: hello brave new world"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, None, "stop"]
    assert len({c.id for c in chunks}) == 1


async def test_openai_stream_with_include_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    *content, last = chunks
    assert content[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (4, 5, 9)


async def test_openai_stream_raw_wire_format(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script({"content": "a b"})
    body = {"model": "m", "messages": USER, "stream": True}
    async with http.post(f"{fake.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])


async def test_max_tokens_truncates_with_finish_length(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    completion = await oai.chat.completions.create(model="m", messages=USER, max_completion_tokens=2)
    assert completion.choices[0].message.content == "Echo: hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2

    stream = await oai.chat.completions.create(model="m", messages=USER, max_tokens=3, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: hello brave"
    assert chunks[-1].choices[0].finish_reason == "length"

    message = await claude.messages.create(model="c", max_tokens=1, messages=USER)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text == "Echo:"


async def test_scripted_content_and_usage(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"content": "scripted answer", "usage": {"prompt_tokens": 100, "completion_tokens": 7}})
    completion = await oai.chat.completions.create(model="m", messages=USER)
    assert completion.choices[0].message.content == "scripted answer"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        100,
        7,
        107,
    )
    # The queue is drained: back to the default answer.
    again = await oai.chat.completions.create(model="m", messages=USER)
    assert again.choices[0].message.content == "Echo: hello brave new world"


async def test_openai_tool_calls_non_stream(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    completion = await oai.chat.completions.create(model="m", messages=USER)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"Paris"}'


async def test_openai_tool_calls_stream_accumulates_in_sdk(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris"}},
    ]
    fake.script({"tool_calls": calls}, {"tool_calls": calls})

    stream = await oai.chat.completions.create(model="m", messages=USER, stream=True)
    argument_deltas = [
        tool_call.function.arguments
        async for chunk in stream
        for tool_call in chunk.choices[0].delta.tool_calls or []
        if tool_call.index == 0 and tool_call.function and tool_call.function.arguments
    ]
    assert len(argument_deltas) >= 2

    async with oai.chat.completions.stream(model="m", messages=USER) as helper:
        async for _ in helper:
            pass
        final = await helper.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    tool_calls = final.choices[0].message.tool_calls
    assert tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in tool_calls] == [
        ("get_weather", '{"city":"Paris","unit":"celsius"}'),
        ("get_time", '{"tz":"Europe/Paris"}'),
    ]


# -- errors --------------------------------------------------------------------------------------------------------


async def test_429_with_retry_after_seen_by_raw_client(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script({"status": 429, "retry_after": 1.5, "retry_after_ms": 1500, "message": "slow down"})
    body = {"model": "m", "messages": USER}
    async with http.post(f"{fake.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1.5"
        assert resp.headers["retry-after-ms"] == "1500"
        error = (await resp.json())["error"]
    assert error["message"] == "slow down"
    assert error["param"] is None
    assert error["code"] == "rate_limit_exceeded"


async def test_scripted_headers_on_answers_streams_and_errors(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script(
        {"headers": {"Set-Cookie": "lb=1"}},
        {"headers": {"x-stream": "yes"}},
        {"headers": {"x-error": "yes"}, "status": 503, "retry_after": 2},
    )
    url = f"{fake.base_url}/v1/chat/completions"
    async with http.post(url, json={"model": "m", "messages": USER}) as resp:
        assert resp.status == 200 and resp.headers["Set-Cookie"] == "lb=1"
    async with http.post(url, json={"model": "m", "messages": USER, "stream": True}) as resp:
        assert resp.headers["x-stream"] == "yes" and resp.headers["Content-Type"].startswith("text/event-stream")
        await resp.read()
    async with http.post(url, json={"model": "m", "messages": USER}) as resp:
        assert resp.status == 503 and resp.headers["x-error"] == "yes" and resp.headers["Retry-After"] == "2"
    with pytest.raises(ValueError, match="headers must be an object of strings"):
        fake.script({"headers": {"x": 1}})


async def test_500_raises_in_sdk(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"status": 500, "message": "boom"})
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="m", messages=USER)
    assert caught.value.status_code == 500
    assert caught.value.body == {"message": "boom", "type": "server_error", "param": None, "code": None}


async def test_times_repeats_a_step(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"status": 503, "times": 2}, {"content": "finally"})
    assert fake.stats["queued"] == 3
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            await oai.chat.completions.create(model="m", messages=USER)
        assert caught.value.status_code == 503
    completion = await oai.chat.completions.create(model="m", messages=USER)
    assert completion.choices[0].message.content == "finally"


async def test_context_length_exceeded(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"context_length_exceeded": True})
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="m", messages=USER)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is" in caught.value.message


async def test_malformed_bodies_break_the_sdk(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"malformed": True}, {"malformed": True})
    with pytest.raises(ValueError):  # json.JSONDecodeError
        await oai.chat.completions.create(model="m", messages=USER)

    stream = await oai.chat.completions.create(model="m", messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(ValueError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")  # noqa: PERF401 (keep what came before the error)
    assert received == ["Echo: "]


async def test_cut_stream_raises_on_the_client(
    fake: FakeUpstream, oai: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    fake.script({"cut_after_chunks": 2}, {"cut_after_chunks": 10})
    stream = await oai.chat.completions.create(model="m", messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")  # noqa: PERF401 (keep what came before the error)
    assert received == ["Echo: ", "hello "]

    # Past the last content chunk the cut still comes before [DONE].
    body = {"model": "m", "messages": USER, "stream": True}
    async with http.post(f"{fake.base_url}/v1/chat/completions", json=body) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert fake.stats["cancelled_streams"] == 0  # we cut it: the client did not go away


# -- timing and cancellation ---------------------------------------------------------------------------------------


async def test_delay_and_hang_time_out_and_count_cancellations(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"delay_s": 5.0}, {"hang": True})
    for _ in range(2):
        with pytest.raises(openai.APITimeoutError):
            await oai.chat.completions.create(model="m", messages=USER, timeout=0.2)
    await _eventually(lambda: fake.stats["cancelled"] == 2 and fake.stats["active"] == 0)


def test_jittered_delays_spread_around_the_default() -> None:
    """``delay_jitter_s`` draws each request's wait from delay ± jitter (seeded), unless a step sets ``delay_s``."""
    with FakeUpstreamThread(delay_s=0.05, delay_jitter_s=0.04, seed=7, record=False) as upstream:
        client = openai.OpenAI(base_url=f"{upstream.base_url}/v1", api_key="k", max_retries=0)
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            client.chat.completions.create(model="m", messages=USER)
            times.append(time.perf_counter() - t0)
        upstream.script({"delay_s": 0.0})
        t0 = time.perf_counter()
        client.chat.completions.create(model="m", messages=USER)
        scripted = time.perf_counter() - t0
    assert min(times) >= 0.01 and min(times) < 0.035 and max(times) > 0.065
    assert scripted < 0.01 + min(times)


def test_a_request_may_choose_its_delay() -> None:
    """``metadata.fake_delay_s`` overrides the server's delay (jitter included), not a scripted step's; a value that
    is not a sane number of seconds is ignored."""
    with FakeUpstreamThread(delay_s=0.3, delay_jitter_s=0.1, record=False) as upstream:
        client = openai.OpenAI(base_url=f"{upstream.base_url}/v1", api_key="k", max_retries=0)

        def timed(delay: str, **kw: Any) -> float:
            t0 = time.perf_counter()
            client.chat.completions.create(model="m", messages=USER, metadata={"fake_delay_s": delay}, **kw)
            return time.perf_counter() - t0

        assert timed("0.001") < 0.15
        assert 0.12 <= timed("0.12") < 0.19
        assert timed("nan") >= 0.2 and timed("-1") >= 0.2  # ignored: the server's delay
        upstream.script({"delay_s": 0.25})
        assert timed("0") >= 0.25


async def test_client_disconnect_mid_stream_cancels(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script({"chunk_delay_s": 0.5})
    body = {"model": "m", "messages": USER, "stream": True}
    resp = await http.post(f"{fake.base_url}/v1/chat/completions", json=body)
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    assert fake.stats["active_streams"] == 1
    resp.close()
    await _eventually(lambda: fake.stats["cancelled_streams"] == 1 and fake.stats["active_streams"] == 0)
    assert fake.stats["cancelled"] == 1


async def test_first_chunk_delay_sends_headers_first(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script({"first_chunk_delay_s": 1.0, "content": "a b c", "chunk_delay_s": 0.05})
    body = {"model": "m", "messages": USER, "stream": True}
    started = time.monotonic()
    async with http.post(f"{fake.base_url}/v1/chat/completions", json=body) as resp:
        assert time.monotonic() - started < 0.8
        await resp.content.readline()
        assert time.monotonic() - started >= 1.0
        await resp.read()
    assert time.monotonic() - started >= 1.1


# -- Anthropic -----------------------------------------------------------------------------------------------------


async def test_anthropic_non_stream(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-x",
        max_tokens=100,
        system=[{"type": "text", "text": "be very terse"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    )
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant" and message.model == "claude-x"
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "text" and block.text == "Echo: hi there"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)


async def test_anthropic_tool_use_non_stream(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    fake.script({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    message = await claude.messages.create(model="c", max_tokens=100, messages=USER)
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_") and block.name == "get_weather" and block.input == {"city": "Paris"}


async def test_anthropic_stream_text_and_tool_use(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    fake.script({"content": "Let me check.", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    async with claude.messages.stream(model="c", max_tokens=100, messages=USER) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Let me check."
    assert final.stop_reason == "tool_use"
    text_block, tool_block = final.content
    assert text_block.type == "text" and text_block.text == "Let me check."
    assert tool_block.type == "tool_use" and tool_block.name == "get_weather" and tool_block.input == {"city": "Paris"}
    assert final.usage.output_tokens == 4


async def test_anthropic_stream_wire_format(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    fake.script({"content": "one two", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]})
    body = {"model": "c", "max_tokens": 10, "messages": USER, "stream": True}
    async with http.post(f"{fake.base_url}/v1/messages", json=body) as resp:
        text = await resp.text()
    events = [event.split("\n")[0].removeprefix("event: ") for event in text.split("\n\n") if event]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 3,  # '{"x":1}' in pieces
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"type":"input_json_delta"' in text and '"stop_reason":"tool_use"' in text


async def test_anthropic_errors(
    fake: FakeUpstream, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    fake.script({"status": 529, "message": "Overloaded"}, {"context_length_exceeded": True})
    with pytest.raises(anthropic.APIStatusError) as caught:
        await claude.messages.create(model="c", max_tokens=10, messages=USER)
    assert caught.value.status_code == 529
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

    body = {"model": "c", "max_tokens": 10, "messages": USER}
    async with http.post(f"{fake.base_url}/v1/messages", json=body) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("prompt is too long")


async def test_anthropic_cut_stream_raises(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    fake.script({"cut_after_chunks": 1})
    texts: list[str] = []
    with pytest.raises(Exception, match="incomplete chunked read"):  # the SDK lets httpx2's error through
        async with claude.messages.stream(model="c", max_tokens=100, messages=USER) as stream:
            async for text in stream.text_stream:
                texts.append(text)  # noqa: PERF401 (keep what came before the error)
    assert texts == ["Echo: "]


# -- auth, embeddings, models --------------------------------------------------------------------------------------


async def test_api_key_is_enforced(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(api_key="secret") as locked:
        assert locked.base_url is not None
        good = openai.AsyncOpenAI(base_url=f"{locked.base_url}/v1", api_key="secret", max_retries=0)
        completion = await good.chat.completions.create(model="m", messages=USER)
        assert completion.choices[0].message.content == "Echo: hello brave new world"

        bad = openai.AsyncOpenAI(base_url=f"{locked.base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="m", messages=USER)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()

        claude = anthropic.AsyncAnthropic(base_url=locked.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await claude.messages.create(model="c", max_tokens=10, messages=USER)
        assert denied.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "Incorrect or missing API key."},
        }

        body = {"model": "c", "max_tokens": 10, "messages": USER}
        async with http.post(f"{locked.base_url}/v1/messages", json=body, headers={"x-api-key": "secret"}) as resp:
            assert resp.status == 200
        async with http.post(f"{locked.base_url}/v1/messages", json=body) as resp:
            assert resp.status == 401


async def test_embeddings(fake: FakeUpstream, oai: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    result = await oai.embeddings.create(model="embed", input=["the cat sat", "a dog"])
    assert result.model == "embed"
    assert [item.index for item in result.data] == [0, 1]
    vectors = [item.embedding for item in result.data]
    assert all(len(v) == 8 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (5, 5)

    again = await oai.embeddings.create(model="embed", input="the cat sat", dimensions=16)
    assert len(again.data[0].embedding) == 16

    body = {"model": "embed", "input": "the cat sat"}
    async with http.post(f"{fake.base_url}/v1/embeddings", json=body) as resp:
        raw = await resp.json()
    assert raw["data"][0]["embedding"] == pytest.approx(vectors[0], rel=1e-6)
    async with http.post(f"{fake.base_url}/v1/embeddings", json={**body, "encoding_format": "base64"}) as resp:
        encoded = (await resp.json())["data"][0]["embedding"]
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == pytest.approx(vectors[0], rel=1e-6)


async def test_models_lists_default_and_scripted_models(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    fake.script({"content": "x"}, model="gpt-scripted")
    models = [model.id async for model in oai.models.list()]
    assert models == ["fake-model", "gpt-scripted"]


# -- control API ---------------------------------------------------------------------------------------------------


async def test_requests_are_recorded_with_secrets_redacted(
    fake: FakeUpstream, oai: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    await oai.chat.completions.create(model="m", messages=USER, extra_headers={"X-Api-Key": "leak", "X-Trace": "t1"})
    async with http.get(f"{fake.base_url}/_fake/requests") as resp:
        recorded = await resp.json()
    assert recorded == fake.requests
    [entry] = recorded
    assert entry["path"] == "/v1/chat/completions"
    assert entry["body"] == {"model": "m", "messages": USER}
    assert entry["headers"]["authorization"] == "***"
    assert entry["headers"]["x-api-key"] == "***"
    assert entry["headers"]["x-trace"] == "t1"
    assert all(name == name.lower() for name in entry["headers"])

    stats = fake.stats
    assert stats["requests"] == 1 and stats["by_path"] == {"/v1/chat/completions": 1}
    async with http.post(f"{fake.base_url}/_fake/reset") as resp:
        assert resp.status == 200
    assert fake.requests == [] and fake.stats["requests"] == 0


async def test_recording_can_be_disabled() -> None:
    async with FakeUpstream(record=False) as quiet:
        client = openai.AsyncOpenAI(base_url=f"{quiet.base_url}/v1", api_key="k", max_retries=0)
        await client.chat.completions.create(model="m", messages=USER)
        assert quiet.requests == []
        assert quiet.stats["requests"] == 1


async def test_model_specific_queues_win_over_the_global_queue(
    fake: FakeUpstream, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{fake.base_url}/_fake/script", json={"steps": [{"content": "global"}]}) as resp:
        assert await resp.json() == {"queued": 1}
    script = {"steps": [{"content": "for A", "times": 2}], "model": "model-a"}
    async with http.post(f"{fake.base_url}/_fake/script", json=script) as resp:
        assert await resp.json() == {"queued": 2}

    async def answer(model: str) -> str | None:
        completion = await oai.chat.completions.create(model=model, messages=USER)
        return completion.choices[0].message.content

    assert await answer("model-a") == "for A"
    message = await claude.messages.create(model="model-a", max_tokens=10, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == "for A"
    assert await answer("model-a") == "global"  # its own queue is empty: the global one applies
    assert await answer("model-b") == "Echo: hello brave new world"


async def test_bad_scripts_are_rejected(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    for payload in ({"steps": [{"contnet": "typo"}]}, {"steps": {"content": "x"}}, {"steps": [{"times": -1}]}):
        async with http.post(f"{fake.base_url}/_fake/script", json=payload) as resp:
            assert resp.status == 400, payload
            assert "error" in await resp.json()
    with pytest.raises(ValueError, match="unknown step keys"):
        fake.script({"content": "ok"}, {"stauts": 500})
    assert fake.stats["queued"] == 0  # all or nothing


# -- other ways to run it ------------------------------------------------------------------------------------------


def test_thread_runner_with_sync_sdk() -> None:
    with FakeUpstreamThread(chunk_delay_s=0.01) as upstream:
        upstream.script({"content": "from a thread"})
        client = openai.OpenAI(base_url=f"{upstream.base_url}/v1", api_key="k", max_retries=0)
        completion = client.chat.completions.create(model="m", messages=USER)
        assert completion.choices[0].message.content == "from a thread"
        stream = client.chat.completions.create(model="m", messages=USER, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Echo: hello brave new world"
        assert len(upstream.requests) == 2
        assert upstream.stats["by_path"] == {"/v1/chat/completions": 2}
        upstream.reset()
        assert upstream.requests == []


def test_cli_entry_point_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(keel.__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "keel.testing.fake_upstream", "--port", "0", "--api-key", "k", "--no-record"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("fake upstream listening on http://127.0.0.1:")
            base_url = line.rsplit(" ", 1)[1]
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0)
            completion = client.chat.completions.create(model="m", messages=USER)
            assert completion.choices[0].message.content == "Echo: hello brave new world"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
