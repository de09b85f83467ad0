"""Chat sessions through a real Keel and the scripted fake upstream: long conversations that always fit,
summaries, pinned messages, ordering under concurrency (one worker and two, SQLite and PostgreSQL), ownership,
deletion and retention, restarts, and streaming (complete and broken)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy import update

from fixtures.postgres_server import PostgresServer
from helpers import KeelServer, read_sse
from keel.history import SUMMARY_PREFIX, TiktokenCounter
from keel.store import Database
from keel.store.models import ChatSession, utcnow
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]
MASTER = "sk-master-test-0123456789"
AUTH = f"auth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}\n"
SYSTEM = "You are a phone assistant. Be concise."
PINNED = "My name is Ada Lovelace, I live in Paris and my budget is 450 euros."

# gpt-4 and gpt-3.5-turbo as upstream ids: tiktoken's cl100k_base counts them exactly, so the test can check
# the windows to the token. "roomy" has gpt-4o-mini's shipped 128k window.
MODELS = """
  - name: chat
    model: gpt-4
    api_base: {fake}
    context_window: 400
    max_retries: 0
  - name: summarizer
    model: gpt-3.5-turbo
    api_base: {fake}
    context_window: 400
    max_retries: 0
  - name: roomy
    model: gpt-4o-mini
    api_base: {fake}
    max_retries: 0
"""
APPS = f"""
apps:
  - name: phone
    model: chat
    system_prompt: {SYSTEM}
    history: {{strategy: summary, summary_model: summarizer, reserve_output_tokens: 100, summary_max_tokens: 60}}
  - name: roomy
    model: roomy
    system_prompt: {SYSTEM}
    history: {{strategy: window}}
"""


class Client:
    def __init__(self, server: KeelServer, session: aiohttp.ClientSession, key: str | None = None) -> None:
        self.url, self.s, self.key = server.url, session, key

    async def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        token = key or self.key
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.s.request(method, self.url + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def new_session(self, app: str = "phone") -> str:
        status, body = await self.call("POST", "/v1/sessions", {"app": app})
        assert status == 201, body
        return str(body["id"])

    async def say(self, sid: str, content: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", f"/v1/sessions/{sid}/messages", {"content": content, **kw})

    async def export(self, sid: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            status, body = await self.call("GET", f"/v1/sessions/{sid}/messages?after={after}&limit=7")
            assert status == 200, body
            out += body["data"]
            if not body["has_more"]:
                return out
            after = body["next_after"]

    async def stream(self, sid: str, content: str) -> tuple[int, list[tuple[str | None, str]]]:
        """(status, [(event, data)]) read raw, so a missing [DONE] or an error event is visible."""
        body = {"content": content, "stream": True}
        async with self.s.post(f"{self.url}/v1/sessions/{sid}/messages", json=body) as resp:
            if resp.status != 200:
                return resp.status, [(None, await resp.text())]
            return resp.status, await read_sse(resp)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database for a test that runs on both (Keel servers started on it share it)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/sessions.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


def chat_requests(fake: FakeUpstreamThread, model: str = "gpt-4") -> list[dict[str, Any]]:
    return [r["body"] for r in fake.requests if r["path"] == "/v1/chat/completions" and r["body"]["model"] == model]


# -- long conversations ---------------------------------------------------------------------------------------------


async def test_300_turns_always_fit_with_system_prompt_pinned_message_and_summary(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    fake.script({"content": "Summary: Ada Lovelace, Paris, budget 450 euros.", "times": 1000}, model="gpt-3.5-turbo")
    c = Client(keel(MODELS, extra=APPS), http)
    sid = await c.new_session()
    status, first = await c.say(sid, PINNED, pinned=True)
    assert status == 200, first
    turns = 300
    summary_saved_before: int | None = None  # the first request sent once the first summary was stored
    for i in range(1, turns):
        status, body = await c.say(sid, f"Turn {i}: my favourite number is {i * 7} and my friend is Friend{i}.")
        assert status == 200, body
        assert body["message"]["content"].startswith(f"Echo: Turn {i}:")
        assert body["history"]["prompt_tokens"] <= body["history"]["limit"] == 300
        if summary_saved_before is None and not any(
            m["content"].startswith("Turn 1:") for m in chat_requests(fake)[-1]["messages"]
        ):
            # The first turn dropped messages: the fold runs in the background. Wait until it is stored (however
            # slow the machine), so the next request must carry it.
            summary_saved_before = i + 1
            deadline = time.monotonic() + 10
            while (await c.call("GET", f"/v1/sessions/{sid}"))[1]["summary"] is None:
                assert time.monotonic() < deadline, "the first summary was never stored"
                await asyncio.sleep(0.02)

    counter = TiktokenCounter()
    sent = chat_requests(fake)
    assert len(sent) == turns
    first_drop = first_summary = None
    for i, body in enumerate(sent):
        messages = body["messages"]
        tokens = await counter.count(messages)
        assert tokens + body["max_completion_tokens"] <= 400, (i, tokens)  # inside the window, answer included
        assert body["max_completion_tokens"] == 100
        assert messages[0] == {"role": "system", "content": SYSTEM}
        assert {"role": "user", "content": PINNED} in messages
        assert messages[-1]["role"] == "user" and (i == 0 or messages[-1]["content"].startswith(f"Turn {i}:"))
        if i >= 2:  # the previous turn, question and answer, is always there
            assert messages[-3]["content"].startswith(f"Turn {i - 1}:")
            assert messages[-2]["content"].startswith(f"Echo: Turn {i - 1}:")
        summaries = [m for m in messages if m["content"].startswith(SUMMARY_PREFIX)]
        if first_drop is None and i > 1 and not any(m["content"].startswith("Turn 1:") for m in messages):
            first_drop = i
        if summaries:
            assert first_drop is not None and len(summaries) == 1
            assert summaries[0]["content"].endswith("Ada Lovelace, Paris, budget 450 euros.")
            first_summary = first_summary or i
        elif first_summary is not None:
            pytest.fail(f"request {i} lost the summary")
    assert first_drop is not None and first_summary is not None and summary_saved_before is not None
    assert first_drop <= first_summary <= summary_saved_before  # written in the background, used once stored

    # The summarizer saw every dropped message exactly once, in order, with the instruction to keep the facts.
    # A fold may still be running in the background (its call sent, its summary not yet saved): wait for it.
    deadline = time.monotonic() + 10
    while True:
        summary_calls = chat_requests(fake, "gpt-3.5-turbo")
        folded = [
            line
            for body in summary_calls
            for line in body["messages"][1]["content"].split("New messages:\n", 1)[1].splitlines()
        ]
        status, session = await c.call("GET", f"/v1/sessions/{sid}")
        if session["summary"]["upto_seq"] == len(folded) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    for body in summary_calls:
        assert await counter.count(body["messages"]) + body["max_completion_tokens"] <= 400
        assert "names, preferences, numbers" in body["messages"][0]["content"]
    assert folded[0] == f"User: {PINNED}"
    questions = [int(line.split()[2].rstrip(":")) for line in folded if line.startswith("User: Turn")]
    assert questions == list(range(1, len(questions) + 1)) and len(questions) > 250
    # Messages are numbered from 1 and each is one line here, so the summary covers exactly the folded ones. (A fold
    # may end on a question whose answer comes in the next one.)
    assert session["summary"]["upto_seq"] == len(folded) and session["message_count"] == 2 * turns


async def test_a_prompt_versions_model_serves_the_turn_with_its_window(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A managed prompt that names a model moves the turn to it: the upstream call, the headers, and the history
    budget (a question too long for the app's 400-token model fits the prompt's bigger one)."""
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "roomy-prompt.yaml").write_text("name: roomy-prompt\nmodel: roomy\nsystem: Be brief.\n")
    extra = f"""
prompts_dir: {tmp_path / "prompts"}
apps:
  - {{name: small, model: chat, history: {{strategy: window}}}}
  - {{name: moved, model: chat, prompt: {{name: roomy-prompt}}, history: {{strategy: window}}}}
"""
    c = Client(keel(MODELS, extra=extra), http)
    question = "Which phone? " + "battery " * 500
    status, body = await c.say(await c.new_session("small"), question)
    assert status == 413 and body["error"]["code"] == "context_length_exceeded"  # too long for the app's model
    async with http.post(
        f"{c.url}/v1/sessions/{await c.new_session('moved')}/messages", json={"content": question}
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert resp.headers["x-keel-model"] == "roomy" and resp.headers["x-keel-deployment"] == "roomy"
    sent = chat_requests(fake, "gpt-4o-mini")[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][-1]["content"] == question


async def test_window_strategy_drops_without_summary(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    apps = APPS.replace("{strategy: summary, summary_model: summarizer,", "{strategy: window,")
    c = Client(keel(MODELS, extra=apps), http)
    sid = await c.new_session()
    for i in range(12):
        status, body = await c.say(sid, f"Question {i} about batteries and charging speeds")
        assert status == 200
    assert body["history"]["dropped"] > 0 and not body["history"]["summary"]
    assert not chat_requests(fake, "gpt-3.5-turbo")


async def test_a_message_too_long_for_the_window_is_refused_and_not_kept(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    c = Client(keel(MODELS, extra=APPS + "sessions: {max_message_chars: 5000}\n"), http)
    sid = await c.new_session()
    status, body = await c.say(sid, "battery " * 400)
    assert status == 413 and body["error"]["code"] == "context_length_exceeded"
    assert "300 tokens (context window 400 minus 100 reserved for the answer" in body["error"]["message"]
    status, body = await c.say(sid, "x" * 5001)
    assert status == 413 and body["error"]["code"] == "message_too_long"
    assert await c.export(sid) == [] and fake.requests == []
    status, body = await c.say(sid, "short one")
    assert status == 200 and body["user_message"]["seq"] == 1  # nothing was numbered for the refused ones


# -- ordering -------------------------------------------------------------------------------------------------------


def check_in_order(messages: list[dict[str, Any]], sent: list[dict[str, Any]], n: int) -> None:
    """n turns, numbered 1..2n, each question followed by its own answer, each question once; and every upstream
    request saw all the turns before it (so no two turns overlapped)."""
    assert [m["seq"] for m in messages] == list(range(1, 2 * n + 1))
    assert [m["role"] for m in messages] == ["user", "assistant"] * n
    assert all(a["content"] == "Echo: " + q["content"] for q, a in zip(messages[::2], messages[1::2], strict=True))
    assert sorted(m["content"] for m in messages[::2]) == sorted(f"message {i}" for i in range(n))
    by_question = {body["messages"][-1]["content"]: body["messages"] for body in sent}
    for k, question in enumerate(messages[::2]):
        assert len(by_question[question["content"]]) == 1 + 2 * k + 1


@pytest.mark.parametrize("workers", [1, 2])
async def test_messages_sent_at_once_are_answered_in_order(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession, db_url: str, workers: int
) -> None:
    """Two workers: two Keel servers on one database."""
    servers = [keel(MODELS, extra=f"database_url: {db_url}\n" + APPS) for _ in range(workers)]
    clients = [Client(s, http) for s in servers]
    fake.script({"delay_s": 0.03, "times": 10}, model="gpt-4o-mini")
    sid = await clients[0].new_session("roomy")
    results = await asyncio.gather(*(clients[i % workers].say(sid, f"message {i}") for i in range(10)))
    assert all(status == 200 for status, _ in results), results
    assert sorted(body["message"]["seq"] for _, body in results) == list(range(2, 21, 2))
    check_in_order(await clients[-1].export(sid), chat_requests(fake, "gpt-4o-mini"), 10)


# -- ownership, limits, deletion, retention, restarts ---------------------------------------------------------------


async def test_sessions_belong_to_their_user(keel: Keel, http: aiohttp.ClientSession, db_url: str) -> None:
    server = keel(MODELS, extra=AUTH + f"database_url: {db_url}\n" + APPS)
    admin = Client(server, http, MASTER)
    keys = {}
    for user in ("alice", "bob"):
        status, body = await admin.call("POST", "/v1/admin/keys", {"user_id": user})
        assert status == 201
        keys[user] = body["key"]
    alice, bob = Client(server, http, keys["alice"]), Client(server, http, keys["bob"])
    sid = await alice.new_session()
    assert (await alice.say(sid, "my secret plan"))[0] == 200
    bobs = await bob.new_session()

    status, missing = await bob.call("GET", "/v1/sessions/ses_000000000000000000000000")
    assert status == 404
    for method, path, body in (
        ("GET", f"/v1/sessions/{sid}", None),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "let me in"}),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("PATCH", f"/v1/sessions/{sid}/messages/1", {"pinned": True}),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ):
        status, err = await bob.call(method, path, body)
        assert status == 404, (method, path)
        assert err["error"] | {"message": ""} == missing["error"] | {"message": ""}  # same as a missing one
        assert err["error"]["message"] == missing["error"]["message"].replace("ses_000000000000000000000000", sid)
    assert [s["id"] for s in (await bob.call("GET", "/v1/sessions"))[1]["data"]] == [bobs]
    assert [s["id"] for s in (await admin.call("GET", "/v1/sessions"))[1]["data"]] == []
    status, _ = await bob.call("DELETE", "/v1/sessions?user=alice")
    assert status == 403
    assert (await bob.call("DELETE", "/v1/sessions?user=me"))[1]["deleted"] == 1
    assert len(await alice.export(sid)) == 2  # untouched
    status, body = await alice.call("GET", "/v1/sessions")
    assert [s["id"] for s in body["data"]] == [sid] and body["data"][0]["title"] == "my secret plan"
    # a rotated key of the same user keeps the user's sessions; the master key may erase a user's data
    status, body = await admin.call("POST", "/v1/admin/keys", {"user_id": "alice"})
    assert (await Client(server, http, body["key"]).call("GET", f"/v1/sessions/{sid}"))[0] == 200
    assert (await admin.call("DELETE", "/v1/sessions?user=alice"))[1]["deleted"] == 1
    assert (await alice.call("GET", f"/v1/sessions/{sid}"))[0] == 404
    status, _ = await Client(server, http).call("GET", "/v1/sessions")
    assert status == 401


async def test_limits_and_model_permissions_apply_and_refusals_keep_nothing(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    server = keel(MODELS, extra=AUTH + APPS)
    admin = Client(server, http, MASTER)
    status, body = await admin.call("POST", "/v1/admin/keys", {"user_id": "carol", "rpm": 1})
    carol = Client(server, http, body["key"])
    sid = await carol.new_session()
    assert (await carol.say(sid, "first"))[0] == 200
    status, body = await carol.say(sid, "second")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert [m["content"] for m in await carol.export(sid)] == ["first", "Echo: first"]
    status, body = await admin.call("POST", "/v1/admin/keys", {"user_id": "dave", "models": ["roomy"]})
    dave = Client(server, http, body["key"])
    sid = await dave.new_session("phone")
    status, body = await dave.say(sid, "hello")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert await dave.export(sid) == [] and len(chat_requests(fake)) == 1


async def test_delete_session_and_retention(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession, db_url: str
) -> None:
    server = keel(MODELS, extra=f"database_url: {db_url}\n" + APPS)
    c = Client(server, http)
    gone, old, recent = await c.new_session(), await c.new_session(), await c.new_session()
    for sid in (gone, old, recent):
        assert (await c.say(sid, "hello"))[0] == 200
    status, body = await c.call("DELETE", f"/v1/sessions/{gone}")
    assert status == 200 and body == {"id": gone, "object": "session.deleted", "deleted": True}
    assert (await c.call("GET", f"/v1/sessions/{gone}/messages"))[0] == 404
    assert (await c.call("DELETE", f"/v1/sessions/{gone}"))[0] == 404
    server.stop()
    db = Database.from_url(db_url)
    async with db.session() as s:
        long_ago = utcnow() - timedelta(days=365)
        await s.execute(update(ChatSession).where(ChatSession.id == old).values(last_message_at=long_ago))
    await db.dispose()
    c = Client(keel(MODELS, extra=f"database_url: {db_url}\nsessions: {{retention_days: 30}}\n" + APPS), http)
    deadline = time.monotonic() + 5
    while (await c.call("GET", f"/v1/sessions/{old}"))[0] != 404:  # swept at start, in the background
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert [s["id"] for s in (await c.call("GET", "/v1/sessions"))[1]["data"]] == [recent]


async def test_history_survives_a_restart(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession, db_url: str
) -> None:
    extra = f"database_url: {db_url}\n" + APPS
    first = keel(MODELS, extra=extra)
    c = Client(first, http)
    sid = await c.new_session("roomy")
    for text in ("I have a Pixel 8", "It charges slowly"):
        assert (await c.say(sid, text))[0] == 200
    first.stop()
    c = Client(keel(MODELS, extra=extra), http)
    assert [m["content"] for m in await c.export(sid)] == [
        "I have a Pixel 8",
        "Echo: I have a Pixel 8",
        "It charges slowly",
        "Echo: It charges slowly",
    ]
    status, body = await c.say(sid, "Why?")
    assert status == 200 and body["message"]["seq"] == 6
    assert [m["content"] for m in chat_requests(fake, "gpt-4o-mini")[-1]["messages"]] == [
        SYSTEM,
        "I have a Pixel 8",
        "Echo: I have a Pixel 8",
        "It charges slowly",
        "Echo: It charges slowly",
        "Why?",
    ]


async def test_pin_and_unpin(keel: Keel, http: aiohttp.ClientSession) -> None:
    c = Client(keel(MODELS, extra=APPS), http)
    sid = await c.new_session()
    await c.say(sid, "remember this")
    status, body = await c.call("PATCH", f"/v1/sessions/{sid}/messages/1", {"pinned": True})
    assert status == 200 and body["pinned"] and body["seq"] == 1
    status, body = await c.call("PATCH", f"/v1/sessions/{sid}/messages/9", {"pinned": True})
    assert status == 404
    status, body = await c.call("PATCH", f"/v1/sessions/{sid}/messages/1", {"pinned": "yes please"})
    assert status == 400 and body["error"]["param"] == "pinned"


async def test_app_selection(keel: Keel, http: aiohttp.ClientSession) -> None:
    c = Client(keel(MODELS, extra=APPS), http)
    status, body = await c.call("POST", "/v1/sessions", {})
    assert status == 400 and "Several apps" in body["error"]["message"]
    status, body = await c.call("POST", "/v1/sessions", {"app": "nope"})
    assert status == 404 and body["error"]["code"] == "app_not_found"
    one_app = APPS.split("  - name: roomy")[0]
    c = Client(keel(MODELS, extra=one_app), http)
    status, body = await c.call("POST", "/v1/sessions", {"title": "Choosing a phone"})
    assert status == 201 and body["app"] == "phone" and body["title"] == "Choosing a phone"


# -- streaming ------------------------------------------------------------------------------------------------------


async def test_streaming_turn_ends_with_the_saved_message(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    c = Client(keel(MODELS, extra=APPS), http)
    sid = await c.new_session()
    status, events = await c.stream(sid, "tell me about USB-C")
    assert status == 200 and events[-1] == (None, "[DONE]")
    event, data = events[-2]
    assert event == "session"
    turn = orjson.loads(data)
    assert turn["session_id"] == sid and turn["message"]["seq"] == 2 and turn["user_message"] == {"seq": 1}
    assert "content" not in turn["message"] and turn["message"]["finish_reason"] == "stop"
    chunks = [orjson.loads(d) for e, d in events[:-2] if e is None]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == "Echo: tell me about USB-C" and chunks[-1]["usage"]["cost"] is None
    assert [(m["role"], m["content"]) for m in await c.export(sid)] == [
        ("user", "tell me about USB-C"),
        ("assistant", "Echo: tell me about USB-C"),
    ]


async def test_broken_stream_keeps_the_question_and_a_retry_does_not_duplicate_it(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    c = Client(keel(MODELS, extra=APPS), http)
    sid = await c.new_session()
    fake.script({"cut_after_chunks": 2}, model="gpt-4")
    status, events = await c.stream(sid, "how fast does it charge?")
    assert status == 200 and all(data != "[DONE]" for _, data in events)
    assert events[-1][0] == "error" and "upstream_error" in events[-1][1]
    assert all(event != "session" for event, _ in events)
    [question] = await c.export(sid)
    assert question["status"] == "failed" and question["metadata"]["error"]["code"] == "upstream_error"
    status, body = await c.say(sid, "how fast does it charge?")  # the retry
    assert status == 200 and body["user_message"] == {"seq": 1} and body["message"]["seq"] == 2
    messages = await c.export(sid)
    assert [(m["seq"], m["role"], m["status"]) for m in messages] == [(1, "user", "ok"), (2, "assistant", "ok")]
    # the retry's prompt holds the question once
    assert [m["content"] for m in chat_requests(fake)[-1]["messages"]] == [SYSTEM, "how fast does it charge?"]


async def test_client_leaving_mid_stream_frees_the_session(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    c = Client(keel(MODELS, extra=APPS), http)
    sid = await c.new_session("roomy")
    fake.script({"content": " ".join(["word"] * 200), "chunk_delay_s": 0.02}, model="gpt-4o-mini")
    resp = await http.post(f"{c.url}/v1/sessions/{sid}/messages", json={"content": "long one", "stream": True})
    await resp.content.readline()
    resp.close()
    status, _body = await asyncio.wait_for(c.say(sid, "are you there?"), 5)
    assert status == 200
    assert [(m["content"], m["status"]) for m in await c.export(sid)] == [
        ("long one", "failed"),
        ("are you there?", "ok"),
        ("Echo: are you there?", "ok"),
    ]


async def test_background_summaries_count_against_the_owners_budgets(
    keel: Keel, fake: FakeUpstreamThread, http: aiohttp.ClientSession
) -> None:
    """A summary is written after its turn has settled, so it is charged to the key's budgets on its own: with the
    soft threshold set between the turns' cost and the turns' plus the summaries', the next request is
    downgraded."""
    price = "price: {input_per_mtok: 1000, output_per_mtok: 1000}"
    models = (
        f"  - {{name: chat, model: gpt-4, api_base: '{{fake}}', context_window: 400, max_retries: 0, {price}}}\n"
        f"  - {{name: summarizer, model: gpt-3.5-turbo, api_base: '{{fake}}', context_window: 400, {price}}}\n"
        "  - {name: cheap, model: up-cheap, api_base: '{fake}', price: {input_per_mtok: 1, output_per_mtok: 1}}\n"
    )
    server = keel(models, extra=AUTH + APPS.split("  - name: roomy")[0] + "budgets: {downgrade_model: cheap}\n")
    fake.script({"content": "Summary: Ada, Paris.", "times": 1000}, model="gpt-3.5-turbo")
    admin = Client(server, http, key=MASTER)
    status, key = await admin.call("POST", "/v1/admin/keys", {"user_id": "ada", "budget_usd": 100})
    assert status == 201, key
    c = Client(server, http, key=key["key"])
    sid = await c.new_session()
    for i in range(1, 60):
        status, body = await c.say(sid, f"Turn {i}: my favourite number is {i * 7} and my friend is Friend{i}.")
        assert status == 200, body
        if (await c.call("GET", f"/v1/sessions/{sid}"))[1]["summary"] is not None:
            break
    deadline = time.monotonic() + 10
    while fake.stats["active"] and time.monotonic() < deadline:  # a fold still in flight
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    status, usage = await admin.call("GET", f"/v1/usage?group_by=model&key_id={key['id']}")
    costs = {row["group"]: row["cost_usd"] for row in usage["data"]}
    assert costs["summarizer"] > 0 and costs["chat"] > 0
    soft = costs["chat"] + costs["summarizer"] / 2
    status, _ = await admin.call("PATCH", f"/v1/admin/keys/{key['id']}", {"soft_budget_usd": round(soft, 6)})
    assert status == 200
    async with http.post(
        server.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key['key']}"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers.get("x-keel-downgraded") == "chat->cheap"
