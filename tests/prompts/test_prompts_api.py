"""Prompt management and feedback over HTTP, through a real Keel on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from fixtures.postgres_server import PostgresServer
from helpers import KeelServer, chat_body
from keel.prompts.models import PromptFeedback
from keel.store import Database
from keel.testing.fake_upstream import FakeUpstreamThread

Keel = Callable[..., KeelServer]
MASTER = "sk-master-prompts-0123456789"
MODELS = """
  - name: smart
    model: up-smart
    api_base: {fake}
    max_retries: 0
"""
BASE = "/v1/admin/prompts/assistant"


class Client:
    def __init__(self, server: KeelServer, session: aiohttp.ClientSession) -> None:
        self.url = server.url
        self.s = session

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = MASTER, actor: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if actor:
            headers["X-Keel-Actor"] = actor
        async with self.s.request(method, self.url + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/prompts.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


def start(keel: Keel, database_url: str, extra: str = "") -> KeelServer:
    return keel(
        MODELS,
        extra=f"database_url: {database_url}\nauth: {{master_key: {MASTER}, key_cache_ttl_s: 0}}\n"
        f"accounting: {{flush_interval_s: 0.1}}\n{extra}",
    )


VERSION_1 = {
    "system": "You help {{ user }} with phones.{% if context %} Context: {{ context }}{% endif %}",
    "variables": {"user": {"description": "who asks"}, "context": {"default": ""}},
    "message": "first version",
}


async def test_versions_labels_rollback_diff_and_render(
    keel: Keel, database_url: str, session: aiohttp.ClientSession
) -> None:
    c = Client(start(keel, database_url), session)
    status, v1 = await c.call("POST", f"{BASE}/versions", VERSION_1, actor="alice")
    assert status == 201 and (v1["version"], v1["created"], v1["created_by"]) == (1, True, "alice")
    assert v1["message"] == "first version" and len(v1["content_hash"]) == 64
    status, same = await c.call("POST", f"{BASE}/versions", VERSION_1, actor="bob")
    assert status == 200 and (same["version"], same["created"]) == (1, False)
    v2_body = {**VERSION_1, "system": "Hi {{ user }}!", "params": {"temperature": 0.3}, "message": "shorter"}
    status, v2 = await c.call("POST", f"{BASE}/versions", v2_body, actor="bob")
    assert status == 201 and v2["version"] == 2 and v2["params"] == {"temperature": 0.3}

    for bad, code in (
        ({"system": "{{ user.__class__ }}", "variables": {"user": {}}}, "invalid_template"),
        ({"system": "{{ nobody }}"}, "invalid_template"),
        ({"system": "x", "model": "gpt-9"}, None),
        ({"system": "x", "params": {"messages": []}}, None),
        ({"variables": {}}, None),
    ):
        status, err = await c.call("POST", f"{BASE}/versions", bad)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", bad
        assert code is None or err["error"]["code"] == code

    status, moved = await c.call("PUT", f"{BASE}/labels/production", {"version": 1}, actor="alice")
    assert status == 200 and (moved["from_version"], moved["to_version"], moved["changed"]) == (None, 1, True)
    status, moved = await c.call("PUT", f"{BASE}/labels/production", {"version": "latest", "reason": "go"}, actor="bob")
    assert (moved["from_version"], moved["to_version"], moved["changed_by"], moved["reason"]) == (1, 2, "bob", "go")
    status, same = await c.call("PUT", f"{BASE}/labels/production", {"version": 2})
    assert status == 200 and same["changed"] is False
    status, err = await c.call("PUT", f"{BASE}/labels/production", {"version": 7})
    assert status == 404 and err["error"]["code"] == "prompt_version_not_found"

    status, back = await c.call("POST", f"{BASE}/labels/production/rollback", actor="carol")
    assert status == 200 and (back["from_version"], back["to_version"], back["action"]) == (2, 1, "rollback")
    status, err = await c.call("POST", f"{BASE}/labels/production/rollback", {"reason": "again"})
    assert status == 409 and err["error"]["code"] == "nothing_to_roll_back"

    status, listing = await c.call("GET", "/v1/admin/prompts")
    assert [(p["name"], p["latest_version"], p["labels"]) for p in listing["data"]] == [
        ("assistant", 2, {"production": 1})
    ]
    status, shown = await c.call("GET", BASE)
    assert shown["labels"]["production"]["updated_by"] == "carol"
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert [(m["to_version"], m["action"], m["changed_by"]) for m in shown["label_history"]] == [
        (1, "rollback", "carol"),
        (2, "set", "bob"),
        (1, "set", "alice"),
    ]
    status, one = await c.call("GET", f"{BASE}/versions/latest")
    assert status == 200 and one["version"] == 2 and one["system"] == "Hi {{ user }}!"
    status, err = await c.call("GET", "/v1/admin/prompts/nope")
    assert status == 404 and err["error"]["code"] == "prompt_not_found"

    status, d = await c.call("GET", f"{BASE}/diff?from=1&to=2")
    assert status == 200 and "+system: Hi {{ user }}!" in d["diff"] and "+  temperature: 0.3" in d["diff"]

    status, rendered = await c.call("POST", f"{BASE}/render", {"variables": {"user": "{{ 7*7 }}"}})
    assert status == 200 and rendered["prompt"] == "assistant@1"
    assert rendered["messages"] == [{"role": "system", "content": "You help {{ 7*7 }} with phones."}]
    status, rendered = await c.call("POST", f"{BASE}/render", {"version": 2, "variables": {"user": "Ann"}})
    assert rendered["messages"] == [{"role": "system", "content": "Hi Ann!"}]
    status, err = await c.call("POST", f"{BASE}/render", {"variables": {}})
    assert status == 400 and err["error"]["code"] == "missing_variables" and "user" in err["error"]["message"]
    status, err = await c.call("POST", f"{BASE}/render", {"variables": {"user": "Ann", "role": "admin"}})
    assert status == 400 and err["error"]["code"] == "unknown_variables" and "role" in err["error"]["message"]


async def test_experiments_and_stats(keel: Keel, database_url: str, session: aiohttp.ClientSession) -> None:
    c = Client(start(keel, database_url), session)
    await c.call("POST", f"{BASE}/versions", VERSION_1)
    await c.call("POST", f"{BASE}/versions", {**VERSION_1, "system": "Hi {{ user }}"})
    status, err = await c.call("POST", f"{BASE}/experiments", {"treatment_version": 2, "percent": 10})
    assert status == 404 and err["error"]["code"] == "prompt_label_not_found"
    await c.call("PUT", f"{BASE}/labels/production", {"version": 1})
    body = {"treatment_version": "latest", "percent": 10, "unit": "session", "rollback_min_requests": 50}
    status, exp = await c.call("POST", f"{BASE}/experiments", body, actor="alice")
    assert status == 201 and exp["active"] and (exp["control_version"], exp["treatment_version"]) == (1, 2)
    assert (exp["unit"], exp["shadow"], exp["rollback_error_factor"], exp["created_by"]) == (
        "session",
        False,
        2.0,
        "alice",
    )
    status, err = await c.call("POST", f"{BASE}/experiments", {"treatment_version": 2, "percent": 5})
    assert status == 409 and err["error"]["code"] == "experiment_running"
    status, err = await c.call("POST", f"{BASE}/experiments", {"treatment_version": 2, "percent": 0})
    assert status == 400 and err["error"]["param"] == "percent"
    status, stopped = await c.call(
        "POST", f"{BASE}/experiments/{exp['id']}/stop", {"reason": "done", "promote": True}, actor="bob"
    )
    assert status == 200 and not stopped["active"] and stopped["stop_reason"] == "done" and stopped["changed"]
    status, shown = await c.call("GET", BASE)
    assert shown["labels"]["production"]["version"] == 2
    status, listing = await c.call("GET", f"{BASE}/experiments")
    assert [e["id"] for e in listing["data"]] == [exp["id"]]

    status, stats = await c.call("GET", f"{BASE}/stats?versions=1,2&since=2020-01-01")
    assert status == 200 and stats["data"] == []
    status, err = await c.call("GET", f"{BASE}/stats?versions=one")
    assert status == 400 and err["error"]["param"] == "versions"


async def test_prompt_admin_needs_the_master_key(keel: Keel, tmp_path: Path, session: aiohttp.ClientSession) -> None:
    c = Client(start(keel, f"sqlite+aiosqlite:///{tmp_path}/k.db"), session)
    status, key = await c.call("POST", "/v1/admin/keys", {"user_id": "alice"})
    assert status == 201
    for method, path in (("GET", "/v1/admin/prompts"), ("POST", f"{BASE}/versions"), ("PUT", f"{BASE}/labels/x")):
        status, err = await c.call(method, path, VERSION_1, key=key["key"])
        assert status == 403 and err["error"]["type"] == "permission_error", path
        status, err = await c.call(method, path, VERSION_1, key=None)
        assert status == 401, path


async def test_feedback_on_own_requests_only(
    keel: Keel, database_url: str, session: aiohttp.ClientSession, fake: FakeUpstreamThread
) -> None:
    c = Client(start(keel, database_url), session)
    keys = []
    for user in ("alice", "bob"):
        status, key = await c.call("POST", "/v1/admin/keys", {"user_id": user})
        keys.append(key["key"])
    request_ids = []
    for key in keys:
        async with session.post(
            c.url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 200
            request_ids.append(r.headers["x-request-id"])
    alice, bob = keys
    alice_request, bob_request = request_ids

    status, err = await c.call("POST", "/v1/feedback", {"request_id": bob_request, "score": 1}, key=alice)
    assert status == 404 and err["error"]["code"] == "request_not_found"
    status, fb = await c.call(
        "POST", "/v1/feedback", {"request_id": alice_request, "score": 1, "comment": "great"}, key=alice
    )
    assert status == 201 and (fb["request_id"], fb["score"], fb["comment"]) == (alice_request, 1, "great")
    status, fb = await c.call("POST", "/v1/feedback", {"request_id": alice_request, "score": -1}, key=alice)
    assert status == 201 and (fb["score"], fb["comment"]) == (-1, None)  # a second rating replaces the first
    status, fb = await c.call("POST", "/v1/feedback", {"request_id": bob_request, "score": -1})  # master: any
    assert status == 201
    status, err = await c.call("POST", "/v1/feedback", {"request_id": "req_unknown", "score": 1}, key=bob)
    assert status == 404
    status, err = await c.call("POST", "/v1/feedback", {"request_id": alice_request, "score": 0}, key=alice)
    assert status == 400 and err["error"]["param"] == "score"
    status, err = await c.call("POST", "/v1/feedback", {"request_id": alice_request, "score": 1}, key=None)
    assert status == 401

    db = Database.from_url(database_url)
    try:
        rows = {(r.request_id, r.score, r.user_id) for r in await _feedback(db)}
    finally:
        await db.dispose()
    assert rows == {(alice_request, -1, "alice"), (bob_request, -1, None)}


async def _feedback(db: Database) -> list[PromptFeedback]:
    async with db.session() as s:
        return list(await s.scalars(select(PromptFeedback)))


async def test_bundled_fallback_is_served_before_anything_is_pushed(
    keel: Keel, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "assistant.yaml").write_text("name: assistant\nsystem: Bundled.\n")
    c = Client(start(keel, f"sqlite+aiosqlite:///{tmp_path}/k.db", f"prompts_dir: {prompts}"), session)
    status, rendered = await c.call("POST", f"{BASE}/render", {})
    assert status == 200 and rendered == {
        "object": "prompt.rendered",
        "prompt": "assistant@fallback",
        "messages": [{"role": "system", "content": "Bundled."}],
    }
