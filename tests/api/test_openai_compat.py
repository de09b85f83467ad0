"""The OpenAI-compatible API, driven by the official SDK against a real Keel and the scripted fake upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from helpers import ONE_MODEL, KeelServer, chat_body
from keel.api import health
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]


def client(server: KeelServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def test_sdk_non_streaming(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    raw = client(server).chat.completions.with_raw_response.create(
        model="smart", messages=[{"role": "user", "content": "What is a phone?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: What is a phone?"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["x-keel-deployment"] == "smart"
    assert raw.headers["x-request-id"].startswith("req_")
    [sent] = fake.requests
    assert sent["body"]["model"] == "up-smart"  # the public name was replaced by the upstream id
    assert sent["headers"]["authorization"] == "***"  # Keel sent its upstream key (the fake redacts it)


async def test_async_sdk_streaming_carries_usage_on_final_chunk(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="smart", messages=[{"role": "user", "content": "tell me about batteries"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Echo: tell me about batteries"
    assert all(ch.choices for ch in chunks)  # no empty-choices chunk for a client that did not ask for one
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    # usage was requested upstream even though the client did not ask
    assert fake.requests[0]["body"]["stream_options"] == {"include_usage": True}


def test_streaming_with_include_usage_gets_separate_usage_chunk(keel: Keel) -> None:
    server = keel(ONE_MODEL)
    chunks = list(
        client(server).chat.completions.create(
            model="smart",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_tools_pass_through_both_ways(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    tools = [{"type": "function", "function": {"name": "get_specs", "parameters": {"type": "object"}}}]
    fake.script(
        {"tool_calls": [{"name": "get_specs", "arguments": {"phone": "Pixel 8"}}]},
        {"tool_calls": [{"name": "get_specs", "arguments": {"phone": "Pixel 9"}}]},
    )
    c = client(server)
    result = c.chat.completions.create(
        model="smart",
        messages=[{"role": "user", "content": "specs?"}],
        tools=tools,
        tool_choice="auto",  # type: ignore[list-item]
        parallel_tool_calls=False,
        seed=7,
    )
    call = result.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_specs" and json.loads(call.function.arguments) == {"phone": "Pixel 8"}  # type: ignore[union-attr]
    sent = fake.requests[0]["body"]
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False and sent["seed"] == 7  # unknown-to-Keel fields pass through
    stream = c.chat.completions.create(
        model="smart",
        messages=[{"role": "user", "content": "specs?"}],
        tools=tools,
        stream=True,  # type: ignore[list-item]
    )
    args = "".join(
        ch.choices[0].delta.tool_calls[0].function.arguments or ""  # type: ignore[index,union-attr]
        for ch in stream
        if ch.choices and ch.choices[0].delta.tool_calls
    )
    assert json.loads(args) == {"phone": "Pixel 9"}


def test_models_and_embeddings(keel: Keel) -> None:
    server = keel(ONE_MODEL + "\n  - name: embed\n    model: up-embed\n    api_base: {fake}\n")
    c = client(server)
    assert [m.id for m in c.models.list()] == ["smart", "embed"]
    assert c.models.retrieve("embed").id == "embed"
    emb = c.embeddings.create(model="embed", input=["a phone", "a battery"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "smart"}, 400, "messages"),
        ({"model": "smart", "messages": []}, 400, "messages"),
        ({"model": "smart", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "smart", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ([1, 2], 400, None),
    ],
)
async def test_bad_requests_get_openai_errors(keel: Keel, body: Any, status: int, param: str | None) -> None:
    server = keel(ONE_MODEL)
    async with aiohttp.ClientSession() as s, s.post(server.url + "/v1/chat/completions", json=body) as resp:
        data = await resp.json()
    assert resp.status == status
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["param"] == param


async def test_malformed_oversized_and_unknown_paths(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL, extra="server: {max_body_bytes: 2048}")
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + "/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert "could not parse the JSON" in (await resp.json())["error"]["message"]
        big = chat_body("x" * 5000)
        async with s.post(server.url + "/v1/chat/completions", json=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"
        async with s.get(server.url + "/v1/nothing-here") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with s.get(server.url + "/v1/chat/completions") as resp:
            assert resp.status == 405
    assert fake.requests == []


def test_upstream_client_error_is_passed_through_not_retried(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 400, "message": "bad logit_bias"})
    with pytest.raises(openai.BadRequestError, match="bad logit_bias"):
        client(server).chat.completions.create(model="smart", messages=[{"role": "user", "content": "x"}])
    assert len(fake.requests) == 1


async def test_request_id_is_honoured_and_logged_once(keel: Keel) -> None:
    server = keel(ONE_MODEL)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("keel.request")
    logger.addHandler(handler)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                server.url + "/v1/chat/completions", json=chat_body(), headers={"X-Request-ID": "abc-123"}
            ) as resp:
                assert resp.headers["x-request-id"] == "abc-123"
                await resp.read()
            async with s.post(
                server.url + "/v1/chat/completions", json=chat_body(), headers={"X-Request-ID": "bad id!"}
            ) as resp:
                assert resp.headers["x-request-id"].startswith("req_")  # unsafe ids are replaced, not echoed
        deadline = time.monotonic() + 2
        while len(records) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "abc-123"
    assert fields["model"] == "smart" and fields["deployment"] == "smart" and fields["outcome"] == "ok"
    assert fields["prompt_tokens"] == 2 and fields["completion_tokens"] == 3
    assert fields["attempts"][0]["outcome"] == "ok" and fields["latency_ms"] > 0


async def test_an_unexpected_error_on_a_fast_path_route_is_a_logged_500(
    keel: Keel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot routes bypass Starlette's error middleware (keel.api.fastpath): a bug must still answer an
    OpenAI-style 500 carrying the request id, be logged with it, and leave the worker serving."""
    server = keel(ONE_MODEL)
    state = server.app.state.keel

    async def broken(ctx: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state.pipeline, "chat", broken)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("keel.app").addHandler(handler)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 500
                rid = resp.headers["x-request-id"]
                error = (await resp.json())["error"]
            monkeypatch.undo()
            async with s.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
    finally:
        logging.getLogger("keel.app").removeHandler(handler)
    assert error["type"] == "server_error" and rid in error["message"] and "a bug" not in error["message"]
    logged = [r for r in records if r.getMessage() == "unhandled error"]
    assert len(logged) == 1 and logged[0].fields["request_id"] == rid  # type: ignore[attr-defined]
    assert logged[0].exc_info is not None


async def test_cookies_an_upstream_sets_are_not_sent_back(keel: Keel, fake: FakeUpstreamThread) -> None:
    """One upstream session serves every tenant: a Set-Cookie must not follow later requests, anyone's."""
    # By host name: aiohttp's default jar ignores cookies from IP addresses, which would hide a regression.
    base = fake.base_url.replace("127.0.0.1", "localhost")
    server = keel(f"  - {{name: smart, model: up-smart, api_base: '{base}/v1', api_key: k}}")
    fake.script({"headers": {"Set-Cookie": "lb=tenant-a; Path=/"}})
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
    first, second = fake.requests[-2:]
    assert "cookie" not in first["headers"] and "cookie" not in second["headers"]


async def test_health_ready_metrics(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        async with s.get(server.url + "/ready") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["checks"]["models"]["smart"]["ok"] is True
        gc.collect()  # a full collection, timed by the worker and recorded with its next request
        async with s.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
        for i in range(3):  # made-up model names: 404s, counted under one label, not one series each
            async with s.post(server.url + "/v1/chat/completions", json=chat_body(model=f"made-up-{i}")) as resp:
                assert resp.status == 404
        for i in range(3):  # the upstream's own error codes are not ours to turn into series either
            fake.script({"status": 400, "code": f"made-up-code-{i}"})
            async with s.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == f"made-up-code-{i}"
        async with s.get(server.url + "/metrics") as resp:
            text = await resp.text()
    assert 'keel_requests_total{model="smart",route="openai.chat",status="200"}' in text
    assert 'keel_requests_total{model="unknown",route="openai.chat",status="404"}' in text
    assert 'keel_upstream_attempts_total{deployment="smart",outcome="upstream_rejected"} 3.0' in text
    assert 'keel_upstream_attempts_total{deployment="smart",outcome="ok"}' in text
    assert 'keel_tokens_total{kind="prompt",model="smart"}' in text
    assert 'keel_tokens_total{kind="completion",model="smart"}' in text
    assert "made-up" not in text
    assert "keel_overhead_seconds_bucket" in text
    pauses = [line for line in text.splitlines() if line.startswith('keel_gc_pause_seconds_count{generation="2"}')]
    assert pauses and float(pauses[0].split()[-1]) >= 1


async def test_ready_reports_chunk_counts_without_counting_on_every_probe(
    keel: Keel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = (
        "apps:\n  - {name: assistant, model: smart, retrieval: {collection: phones}}\n"
        f"vector_store: {{path: {tmp_path / 'vectors'}}}\n"
    )
    server = keel(ONE_MODEL, extra=extra)
    vectors = server.app.state.keel.vectors
    counted: list[str] = []
    real_count = vectors.count

    async def count(collection: str) -> int:
        counted.append(collection)
        return await real_count(collection)

    monkeypatch.setattr(vectors, "count", count)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(server.url + "/ready") as resp:
                index = (await resp.json())["checks"]["vector_index"]
                assert resp.status == 200 and index["ok"] is True and index["chunks"] == {"phones": 0}
        assert counted == ["phones"]  # once, then from the cache
        monkeypatch.setattr(health, "CHUNK_COUNT_TTL_S", 0.0)
        async with s.get(server.url + "/ready") as resp:
            assert resp.status == 200
    assert counted == ["phones", "phones"]


ANTHROPIC = """
  - name: claude
    provider: anthropic
    model: claude-test
    api_base: {fake_root}
    api_key: sk-ant-test
"""


def test_anthropic_upstream_through_openai_api(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ANTHROPIC)
    c = client(server)
    result = c.chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pixel or iPhone?"}],
        max_tokens=50,
    )
    assert result.choices[0].message.content == "Echo: Pixel or iPhone?"
    assert result.usage is not None and result.usage.completion_tokens > 0
    sent = fake.requests[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["body"]["system"] == "Be brief." and sent["body"]["model"] == "claude-test"
    chunks = list(
        c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "stream it"}], stream=True)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Echo: stream it"
    assert chunks[-1].usage is not None
