"""The router's resilience, each behaviour tested against the scripted fake upstream through a real Keel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from helpers import ONE_MODEL, KeelServer, chat_body, read_sse
from keel.llm.router import Breaker
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]


async def post(server: KeelServer, body: dict[str, Any], timeout: float = 10) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.post(server.url + "/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json(content_type=None)


async def sse(server: KeelServer, body: dict[str, Any]) -> tuple[int, list[tuple[str | None, str]]]:
    """(status, [(event, data)]) read raw, so a missing [DONE] or an error event is visible."""
    async with aiohttp.ClientSession() as s, s.post(server.url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, [(None, await resp.text())]
        return resp.status, await read_sse(resp)


# -- retries -----------------------------------------------------------------------------------------------------


async def test_retries_5xx_then_succeeds(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 500}, {"status": 503})
    status, headers, body = await post(server, chat_body())
    assert status == 200 and body["choices"][0]["message"]["content"] == "Echo: hello there"
    assert headers["x-keel-attempts"] == "3"
    assert len(fake.requests) == 3


async def test_malformed_json_is_retried(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"malformed": True})
    status, headers, _ = await post(server, chat_body())
    assert status == 200 and headers["x-keel-attempts"] == "2"


async def test_retry_after_is_honoured(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 429, "retry_after": 0.6})
    t0 = time.monotonic()
    status, _, _ = await post(server, chat_body())
    assert status == 200
    assert time.monotonic() - t0 >= 0.6


async def test_retries_exhausted_returns_last_error(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 500, "times": 3})
    status, _, body = await post(server, chat_body())
    assert status == 502 and body["error"]["type"] == "upstream_error"
    assert "500" in body["error"]["message"]
    assert len(fake.requests) == 3


async def test_retry_after_longer_than_allowed_returns_429_without_waiting(
    keel: Keel, fake: FakeUpstreamThread
) -> None:
    server = keel(ONE_MODEL.replace("max_retries: 2", "max_retries: 2\n    max_retry_after_s: 1"))
    fake.script({"status": 429, "retry_after": 20})
    t0 = time.monotonic()
    status, headers, _ = await post(server, chat_body())
    assert time.monotonic() - t0 < 2
    assert status == 429 and headers["retry-after"] == "20"
    assert len(fake.requests) == 1


async def test_client_errors_are_not_retried(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 422, "message": "nope"})
    status, _, body = await post(server, chat_body())
    assert status == 422 and "nope" in body["error"]["message"]
    assert len(fake.requests) == 1


async def test_backoff_has_full_jitter_bounded_by_cap(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL.replace("retry_backoff_s: 0.01", "retry_backoff_s: 5\n    retry_max_backoff_s: 0.3"))
    fake.script({"status": 500, "times": 2})
    t0 = time.monotonic()
    status, _, _ = await post(server, chat_body())
    assert status == 200 and time.monotonic() - t0 < 0.6 + 0.5  # two waits, each ≤ the 0.3 s cap


# -- circuit breaker ----------------------------------------------------------------------------------------------

TWO_DEPLOYMENTS = """
  - name: smart
    max_retries: 1
    retry_backoff_s: 0
    cooldown: {failures: 2, window_s: 60, cooldown_s: 60}
    deployments:
      - {model: dead, api_base: "http://127.0.0.1:9/v1"}
      - {model: up-smart, api_base: "{fake}"}
"""


async def test_dead_deployment_is_cooled_down(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(TWO_DEPLOYMENTS)
    attempts = []
    for _ in range(12):
        status, headers, _ = await post(server, chat_body())
        assert status == 200 and headers["x-keel-deployment"] == "smart#1"
        attempts.append(int(headers["x-keel-attempts"]))
    # The dead one fails at most `failures` times, then is skipped: later requests need a single attempt.
    assert sum(a - 1 for a in attempts) <= 2
    assert attempts[-4:] == [1, 1, 1, 1]
    async with aiohttp.ClientSession() as s, s.get(server.url + "/ready") as resp:
        ready = await resp.json()
    assert ready["checks"]["models"]["smart"]["deployments"]["smart#0"]["cooling_down_s"] > 0
    assert resp.status == 200  # the model still serves through its healthy deployment


def test_breaker_opens_then_lets_one_trial_through() -> None:
    b = Breaker(failures=2, window_s=10, cooldown_s=5)
    b.failure(100)
    assert b.available(100)
    b.failure(101)
    assert not b.available(102) and b.cooling(102)
    assert b.available(106.5)  # cooldown over: a trial may go
    b.begin(106.5)
    assert not b.available(106.6)  # only one trial at a time
    b.failure(107)  # the trial failed: open again, for the full cooldown
    assert not b.available(111) and b.available(112.1)
    b.begin(112.1)
    b.success()
    assert b.available(112.2) and not b.cooling(112.2)


def test_breaker_failures_outside_window_do_not_count() -> None:
    b = Breaker(failures=2, window_s=10, cooldown_s=5)
    b.failure(100)
    b.failure(111)
    assert b.available(111.5)


def test_breaker_honours_retry_after() -> None:
    b = Breaker(failures=5, window_s=10, cooldown_s=5)
    b.failure(100, retry_after=30)
    assert not b.available(120) and b.available(130.1)


# -- fallbacks ---------------------------------------------------------------------------------------------------

FALLBACKS = """
  - name: smart
    model: up-smart
    api_base: {fake}
    max_retries: 0
    fallbacks: [cheap]
    context_window_fallbacks: [big]
  - name: cheap
    model: up-cheap
    api_base: {fake}
  - name: big
    model: up-big
    api_base: {fake}
"""


async def test_fallback_to_next_model(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(FALLBACKS)
    fake.script({"status": 503}, model="up-smart")
    status, headers, _ = await post(server, chat_body())
    assert status == 200
    assert headers["x-keel-fallback-from"] == "smart" and headers["x-keel-deployment"] == "cheap"
    assert [r["body"]["model"] for r in fake.requests] == ["up-smart", "up-cheap"]


async def test_context_window_fallback(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(FALLBACKS)
    fake.script({"context_length_exceeded": True}, model="up-smart")
    status, headers, _ = await post(server, chat_body())
    assert status == 200 and headers["x-keel-deployment"] == "big"
    assert [r["body"]["model"] for r in fake.requests] == ["up-smart", "up-big"]


async def test_context_window_error_without_fallback_reaches_client(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"context_length_exceeded": True})
    status, _, body = await post(server, chat_body())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert len(fake.requests) == 1


# -- timeouts ----------------------------------------------------------------------------------------------------


async def test_total_timeout_then_retry(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL.replace("max_retries: 2", "max_retries: 1\n    timeout_s: 0.3"))
    fake.script({"hang": True})
    t0 = time.monotonic()
    status, headers, _ = await post(server, chat_body())
    assert status == 200 and headers["x-keel-attempts"] == "2"
    assert 0.3 <= time.monotonic() - t0 < 2


async def test_total_timeout_exhausted_is_504(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL.replace("max_retries: 2", "max_retries: 0\n    timeout_s: 0.2"))
    fake.script({"hang": True})
    status, _, body = await post(server, chat_body())
    assert status == 504 and body["error"]["code"] == "upstream_timeout"


async def test_first_token_timeout_retries_stream(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL.replace("max_retries: 2", "max_retries: 1\n    first_token_timeout_s: 0.3"))
    fake.script({"first_chunk_delay_s": 5})
    t0 = time.monotonic()
    status, events = await sse(server, chat_body(stream=True))
    assert status == 200 and events[-1] == (None, "[DONE]")
    assert time.monotonic() - t0 < 3


# -- the streaming contract --------------------------------------------------------------------------------------


async def test_stream_failing_before_first_byte_gets_http_error(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL.replace("max_retries: 2", "max_retries: 0"))
    fake.script({"status": 500})
    status, events = await sse(server, chat_body(stream=True))
    assert status == 502 and "upstream_error" in events[0][1]


async def test_stream_retried_before_first_byte(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"status": 500}, {"status": 429, "retry_after": 0.1})
    status, events = await sse(server, chat_body(stream=True))
    assert status == 200 and events[-1] == (None, "[DONE]")
    assert len(fake.requests) == 3


async def test_stream_cut_after_first_byte_ends_with_error_event_not_done(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"cut_after_chunks": 2, "content": "one two three four five six"})
    status, events = await sse(server, chat_body(stream=True))
    assert status == 200
    assert all(data != "[DONE]" for _, data in events)
    assert events[-1][0] == "error" and '"upstream_error"' in events[-1][1]
    assert len(fake.requests) == 1  # never retried after the first byte: the client already has part of it


def test_sdk_raises_on_broken_stream(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"cut_after_chunks": 2, "content": "one two three four five six"})
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    got = []
    stream = c.chat.completions.create(model="smart", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError):
        got.extend(stream)
    assert got  # part of the answer arrived before the error


async def test_malformed_chunk_mid_stream_is_an_error_event(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"malformed": True, "content": "a b c d"})
    status, events = await sse(server, chat_body(stream=True))
    assert status == 200 and events[-1][0] == "error"


async def test_client_disconnect_cancels_upstream_stream(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"content": " ".join(["word"] * 200), "chunk_delay_s": 0.05})
    async with aiohttp.ClientSession() as s:
        resp = await s.post(server.url + "/v1/chat/completions", json=chat_body(stream=True))
        await resp.content.readline()
        resp.close()  # the client walks away mid-answer
    deadline = time.monotonic() + 3
    while fake.stats["cancelled"] < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fake.stats["cancelled"] == 1


async def test_client_disconnect_cancels_non_streaming_upstream(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"hang": True})
    with pytest.raises(asyncio.TimeoutError):
        await post(server, chat_body(), timeout=0.3)
    deadline = time.monotonic() + 3
    while fake.stats["cancelled"] < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fake.stats["cancelled"] == 1


async def test_stream_ending_early_without_done_is_an_error_event(keel: Keel, fake: FakeUpstreamThread) -> None:
    server = keel(ONE_MODEL)
    fake.script({"end_after_chunks": 2, "content": "one two three four five six"})
    status, events = await sse(server, chat_body(stream=True))
    assert status == 200 and events[-1][0] == "error"
    assert "without [DONE]" in events[-1][1]
