"""Managed prompts: versions, labels and rollback, sandboxed rendering, experiments, stats, the auto-rollback rule
and the store-down fallbacks, on SQLite and PostgreSQL; the prompt stage and shadow runs against the fake
upstream through a real router."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fixtures.postgres_server import PostgresServer
from keel.api.prompts import diff
from keel.config import AppConfig, PromptRef, parse_config
from keel.context import RequestContext
from keel.errors import InvalidRequest, KeelError, NotFound
from keel.llm.client import UpstreamClient
from keel.llm.pricing import PriceBook
from keel.llm.registry import build_provider
from keel.llm.router import Router
from keel.pipeline import Pipeline
from keel.pipeline.accounting import Accounting
from keel.pipeline.auth import Principal
from keel.pipeline.prompt import PromptStage, ShadowRunner
from keel.prompts import (
    AUTO_ROLLBACK,
    CompiledPrompt,
    ManagedSystemPrompt,
    PromptContent,
    PromptService,
    RollbackRule,
    in_treatment,
    load_prompt_dir,
)
from keel.store import BatchWriter, Database, SpendRepository
from keel.store.models import SpendRecord, utcnow
from keel.testing.fake_upstream import FakeUpstreamThread

NAME = "assistant"


def content(system: str, **variables: dict[str, Any] | None) -> PromptContent:
    return PromptContent.model_validate({"system": system, "variables": variables})


async def push(service: PromptService, system: str, **variables: dict[str, Any] | None) -> int:
    row, _ = await service.push(NAME, content(system, **variables), by="alice")
    return row.version


# -- versions, labels, history -----------------------------------------------------------------------------------


async def test_push_makes_immutable_versions_and_an_unchanged_push_makes_none(database: Database) -> None:
    service = PromptService(database)
    row, created = await service.push(NAME, content("Hello {{ who }}.", who={}), by="alice", message="first")
    assert (row.version, created, row.created_by, row.message) == (1, True, "alice", "first")
    again, created = await service.push(NAME, content("Hello {{ who }}.", who={}), by="bob")
    assert (again.version, created, again.created_by) == (1, False, "alice")
    # The same content spelled differently (an explicit null) is the same content.
    same, created = await service.push(NAME, content("Hello {{ who }}.", who={"default": None}), by="bob")
    assert (same.version, created) == (1, False)
    changed, created = await service.push(NAME, content("Hi {{ who }}!", who={}), by="bob")
    assert (changed.version, created) == (2, True)
    # Going back to the first text is a change too: a new version, never an overwrite.
    reverted, created = await service.push(NAME, content("Hello {{ who }}.", who={}), by="carol")
    assert (reverted.version, created) == (3, True)
    versions = await service.repo.versions(NAME)
    assert [(v.version, v.template["system"]) for v in versions] == [
        (1, "Hello {{ who }}."),
        (2, "Hi {{ who }}!"),
        (3, "Hello {{ who }}."),
    ]
    assert versions[0].content_hash == versions[2].content_hash != versions[1].content_hash
    [(prompt, labels)] = await service.repo.list()
    assert (prompt.name, prompt.latest_version, labels) == (NAME, 3, {})


async def test_concurrent_pushes_number_versions_once_each(database: Database) -> None:
    service = PromptService(database)
    rows = await asyncio.gather(*(service.push(NAME, content(f"Version text {i}"), by="ci") for i in range(6)))
    assert sorted(row.version for row, created in rows) == [1, 2, 3, 4, 5, 6]


async def test_labels_rollback_and_who_changed_what_when(database: Database) -> None:
    repo = PromptService(database).repo
    service = PromptService(database)
    for i in (1, 2, 3):
        await push(service, f"Text {i}")
    first = await repo.set_label(NAME, "production", 1, by="alice", reason="launch")
    assert first is not None and (first.from_version, first.to_version, first.action) == (None, 1, "set")
    assert await repo.set_label(NAME, "production", 1, by="alice") is None  # already there: no history entry
    await repo.set_label(NAME, "production", 2, by="bob")
    await repo.set_label(NAME, "production", "latest", by="carol")
    await repo.set_label(NAME, "staging", 2, by="carol")

    back = await repo.rollback(NAME, "production", by="dave", reason="v3 answers badly")
    assert back is not None and (back.from_version, back.to_version, back.action) == (3, 2, "rollback")
    back = await repo.rollback(NAME, "production", by="dave")
    assert back is not None and (back.from_version, back.to_version) == (2, 1)
    with pytest.raises(InvalidRequest) as exc:
        await repo.rollback(NAME, "production", by="dave")
    assert exc.value.status == 409 and exc.value.code == "nothing_to_roll_back"
    assert {lb.label: lb.version for lb in await repo.labels(NAME)} == {"production": 1, "staging": 2}

    history = [(m.label, m.from_version, m.to_version, m.action, m.changed_by) for m in await repo.history(NAME)]
    assert history == [
        ("production", 2, 1, "rollback", "dave"),
        ("production", 3, 2, "rollback", "dave"),
        ("staging", None, 2, "set", "carol"),
        ("production", 2, 3, "set", "carol"),
        ("production", 1, 2, "set", "bob"),
        ("production", None, 1, "set", "alice"),
    ]
    moves = await repo.history(NAME, "production")
    assert moves[-1].reason == "launch" and moves[0].changed_at >= moves[-1].changed_at

    with pytest.raises(NotFound):
        await repo.set_label(NAME, "production", 9, by="x")
    with pytest.raises(NotFound):
        await repo.set_label("nope", "production", 1, by="x")
    with pytest.raises(InvalidRequest):
        await repo.set_label(NAME, "bad label!", 1, by="x")


async def test_diff_shows_what_changed_between_versions(database: Database) -> None:
    service = PromptService(database)
    await push(service, "Line one.\nLine two.\n")
    await service.push(NAME, PromptContent(system="Line one.\nLine 2.\n", params={"temperature": 0.1}), by="alice")
    old, new = await service.repo.get_version(NAME, 1), await service.repo.get_version(NAME, "latest")
    text = diff(old, new)
    assert text.startswith(f"--- {NAME}@1\n+++ {NAME}@2\n")
    assert "-  Line two.\n" in text and "+  Line 2.\n" in text
    assert "-params: {}\n" in text and "+params:\n+  temperature: 0.1\n" in text
    assert diff(old, old) == ""


# -- rendering ---------------------------------------------------------------------------------------------------


def test_missing_and_undeclared_variables_are_clear_400s() -> None:
    compiled = CompiledPrompt(content("For {{ user }} about {{ topic }}.", user={}, topic={"default": "phones"}), "p@1")
    assert compiled.render({"user": "Ann"}) == [{"role": "system", "content": "For Ann about phones."}]
    with pytest.raises(InvalidRequest) as exc:
        compiled.render({"topic": "batteries"})
    assert exc.value.status == 400 and exc.value.code == "missing_variables" and exc.value.param == "variables"
    assert "p@1 needs the variable(s) user" in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        compiled.render({"user": "Ann", "admin": "yes", "zone": "x"})
    assert exc.value.code == "unknown_variables" and "admin, zone" in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        compiled.render({"user": {"name": "Ann"}})
    assert exc.value.code == "invalid_variables"


@pytest.mark.parametrize(
    "value",
    [
        "{{ 7*7 }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for i in range(3) %}x{% endfor %}",
        "{{ user }}{# comment #}",
        "}}{{",
    ],
)
def test_user_text_with_template_syntax_is_rendered_literally(value: str) -> None:
    compiled = CompiledPrompt(content("Q: {{ user }} | {{ context }}", user={}, context={"default": ""}), "p@1")
    [message] = compiled.render({"user": value, "context": value})
    assert message["content"] == f"Q: {value} | {value}"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ name.__class__ }}", "attribute '__class__' is not allowed"),
        ("{{ name['__class__'] }}", "item '__class__' is not allowed"),
        ("{{ name|attr('upper') }}", "the `attr` filter is not allowed"),
        ("{{ name._private }}", "attribute '_private' is not allowed"),
        ("Hello {{ nobody }}", "undeclared variable(s) nobody"),
        ("{% if name %}unclosed", "syntax error"),
    ],
)
async def test_unsafe_or_broken_templates_are_refused_at_push_time(
    database: Database, template: str, problem: str
) -> None:
    service = PromptService(database)
    with pytest.raises(InvalidRequest) as exc:
        await service.push(NAME, content(template, name={}), by="alice")
    assert exc.value.status == 400 and problem in exc.value.message, exc.value.message
    assert await service.repo.list() == []


def test_a_template_that_fails_at_render_time_is_a_400_not_a_crash() -> None:
    compiled = CompiledPrompt(content("{{ n / 0 }}", n={}), "p@1")
    with pytest.raises(InvalidRequest) as exc:
        compiled.render({"n": 1})
    assert exc.value.code == "prompt_render_failed" and "ZeroDivisionError" in exc.value.message


async def test_push_refuses_a_model_keel_does_not_serve(database: Database) -> None:
    service = PromptService(database, known_models=["smart"])
    with pytest.raises(InvalidRequest) as exc:
        await service.push(NAME, PromptContent(system="x", model="gpt-9"), by="alice")
    assert "gpt-9" in exc.value.message and exc.value.param == "model"


# -- experiments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [1.0, 10.0, 30.0, 50.0, 97.5])
def test_arm_assignment_is_stable_and_splits_as_asked(percent: float) -> None:
    users = [f"user-{i}" for i in range(10_000)]
    arms = [in_treatment(NAME, "exp_1", u, percent) for u in users]
    assert abs(sum(arms) / len(users) - percent / 100) < 0.02  # 4 standard deviations at 50%
    assert arms == [in_treatment(NAME, "exp_1", u, percent) for u in users]
    # Another experiment reshuffles: the same users are not always the guinea pigs.
    other = [in_treatment(NAME, "exp_2", u, percent) for u in users]
    assert other != arms


async def test_experiment_serves_the_treatment_to_its_share_of_users_stably(database: Database) -> None:
    service = PromptService(database, ttl_s=60)
    await push(service, "Control")
    await push(service, "Treatment")
    await service.repo.set_label(NAME, "production", 1, by="alice")
    experiment = await service.repo.start_experiment(NAME, "production", 2, 25, by="alice")
    assert (experiment.control_version, experiment.treatment_version, experiment.active) == (1, 2, True)
    with pytest.raises(InvalidRequest) as exc:
        await service.repo.start_experiment(NAME, "production", 2, 10, by="bob")
    assert exc.value.status == 409 and exc.value.code == "experiment_running"

    seen: dict[str, tuple[str | None, int | None]] = {}
    for i in range(2000):
        r = await service.resolve(NAME, "production", user_id=f"u{i}")
        assert r.experiment_id == experiment.id
        assert (r.arm, r.version) in (("control", 1), ("treatment", 2))
        seen[f"u{i}"] = (r.arm, r.version)
    share = sum(arm == "treatment" for arm, _ in seen.values()) / len(seen)
    assert 0.22 < share < 0.28
    for user in list(seen)[:50]:
        assert ((await service.resolve(NAME, "production", user_id=user)).arm, seen[user][1]) == seen[user]
    anonymous = await service.resolve(NAME, "production")
    assert (anonymous.arm, anonymous.version) == ("control", 1)

    stopped = await service.repo.stop_experiment(experiment.id, by="alice", reason="enough data", promote=True)
    assert stopped is not None and not stopped.active and stopped.stop_reason == "enough data"
    assert await service.repo.stop_experiment(experiment.id, by="alice") is None
    service.invalidate(NAME)
    after = await service.resolve(NAME, "production", user_id="u1")
    assert (after.arm, after.version, after.experiment_id) == (None, 2, None)


async def test_managed_system_prompt_splits_session_experiments_by_session(database: Database) -> None:
    service = PromptService(database, ttl_s=60)
    await service.push(NAME, content("Control on {{ topic }}.", topic={"default": "phones"}), by="alice")
    await push(service, "Treatment.")
    await service.repo.set_label(NAME, "production", 1, by="alice")
    await service.repo.start_experiment(NAME, "production", 2, 50, by="alice", unit="session")
    managed = ManagedSystemPrompt(service)

    static = AppConfig(name="static", model="smart", system_prompt="Static.")
    ctx = RequestContext(request_id="r", route="app.chat")
    assert await managed.system_messages(static, ctx, {}) == [{"role": "system", "content": "Static."}]
    assert (ctx.prompt_name, ctx.response_headers) == (None, {})

    served: dict[str, set[tuple[str | None, int | None, str]]] = {}
    for i in range(100):
        for user in ("ann", "bob"):
            ctx = RequestContext(
                request_id="r", route="app.chat", session_id=f"ses_{i}", principal=Principal("key", "k", user)
            )
            [message] = await managed.system_messages(APP, ctx, {})
            assert ctx.response_headers["x-keel-experiment-arm"] == ctx.experiment_arm
            served.setdefault(f"ses_{i}", set()).add((ctx.experiment_arm, ctx.prompt_version, message["content"]))
    assert all(len(arms) == 1 for arms in served.values())  # one arm per session, whoever writes in it
    assert {arms.pop() for arms in served.values()} == {
        ("control", 1, "Control on phones."),
        ("treatment", 2, "Treatment."),
    }


# -- stats and the auto-rollback rule ----------------------------------------------------------------------------


def ledger_row(version: int | None, latency: float, outcome: str = "ok", **kw: Any) -> dict[str, Any]:
    return {
        "request_id": kw.pop("request_id", f"req_{time.monotonic_ns()}"),
        "route": "sessions.message",
        "model": "smart",
        "deployment": "smart",
        "prompt_name": NAME,
        "prompt_version": version,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "cost_usd_micros": 300,
        "status": 200 if outcome == "ok" else 502,
        "outcome": outcome,
        "latency_ms": latency,
        **kw,
    }


async def test_stats_per_version_from_the_ledger_and_feedback(database: Database) -> None:
    service = PromptService(database)
    await push(service, "One")
    await push(service, "Two")
    rows = [
        ledger_row(1, 10.0 * (i + 1), "upstream_error" if i == 0 else "ok", request_id=f"r1-{i}") for i in range(10)
    ]
    rows += [ledger_row(2, 5.0, request_id=f"r2-{i}", cost_usd_micros=None) for i in range(4)]
    rows += [ledger_row(2, 7.0, "client_closed", request_id="r2-closed")]
    rows += [ledger_row(None, 1.0, request_id="fallback-1")]
    rows += [ledger_row(1, 1.0, request_id="other", prompt_name="other")]
    await SpendRepository(database).insert_many(rows)
    for rid, score in (("r1-1", 1), ("r1-2", 1), ("r1-3", -1), ("r2-0", -1)):
        await service.repo.add_feedback(rid, score, None, key_id=None, user_id=None)
    await service.repo.add_feedback("r1-3", 1, "changed my mind", key_id=None, user_id=None)

    stats = {s.version: s.as_dict() for s in await service.stats(NAME)}
    assert list(stats) == [1, 2, None]
    v1, v2 = stats[1], stats[2]
    assert (v1["requests"], v1["errors"], v1["error_rate"]) == (10, 1, 0.1)
    assert (v1["p50_ms"], v1["p95_ms"]) == (50.0, 100.0)  # nearest rank over 10, 20, ..., 100
    assert v1["avg_cost_usd"] == 0.0003 and v1["avg_prompt_tokens"] == 100 and v1["avg_completion_tokens"] == 20
    assert (v1["thumbs_up"], v1["thumbs_down"], v1["cache_hit_rate"]) == (3, 0, 0.0)
    assert (v2["requests"], v2["errors"], v2["p50_ms"], v2["p95_ms"]) == (5, 0, 5.0, 7.0)  # a closed client is no error
    # Unpriced requests do not pass for free ones: the average is over the one priced request.
    assert v2["avg_cost_usd"] == 0.0003 and (v2["thumbs_up"], v2["thumbs_down"]) == (0, 1)
    only = await service.stats(NAME, [2], since=utcnow() - timedelta(minutes=5))
    assert [s.version for s in only] == [2]
    assert await service.stats(NAME, since=utcnow() + timedelta(minutes=1)) == []


async def test_auto_rollback_stops_an_experiment_whose_treatment_fails(database: Database) -> None:
    service = PromptService(database)
    await push(service, "Control")
    await push(service, "Treatment")
    await service.repo.set_label(NAME, "production", 1, by="alice")
    exp = await service.repo.start_experiment(
        NAME, "production", 2, 50, by="alice", rollback_error_factor=2.0, rollback_min_requests=20
    )
    spend = SpendRepository(database)
    await spend.insert_many(
        [ledger_row(1, 10, "error" if i < 2 else "ok", experiment_arm="control") for i in range(40)]
    )
    # 19 treatment requests, 5 failed: not enough requests yet to judge.
    await spend.insert_many(
        [ledger_row(2, 10, "error" if i < 5 else "ok", experiment_arm="treatment") for i in range(19)]
    )
    assert await service.check_rollbacks() == []
    await spend.insert_many([ledger_row(2, 10, "ok", experiment_arm="treatment")])
    [event] = await service.check_rollbacks()
    assert (event.kind, event.experiment_id, event.from_version, event.to_version) == ("experiment", exp.id, 2, 1)
    assert "25.0% of 20 requests" in event.reason and "5.0%" in event.reason
    [stopped] = await service.repo.experiments(NAME)
    assert (stopped.active, stopped.stopped_by, stopped.stop_reason) == (False, AUTO_ROLLBACK, event.reason)
    assert await service.check_rollbacks() == []


async def test_auto_rollback_rule_only_fires_over_its_factor(database: Database) -> None:
    service = PromptService(database, rule=RollbackRule(min_requests=10))
    await push(service, "Old")
    await push(service, "New")
    spend = SpendRepository(database)
    await spend.insert_many([ledger_row(1, 10, "error" if i < 10 else "ok") for i in range(100)])  # 10%
    await service.repo.set_label(NAME, "production", 1, by="alice")
    await service.repo.set_label(NAME, "production", 2, by="alice")
    await spend.insert_many([ledger_row(2, 10, "error" if i < 2 else "ok") for i in range(10)])  # 20%: not over 2x
    assert await service.check_rollbacks() == []
    assert {lb.label: lb.version for lb in await service.repo.labels(NAME)} == {"production": 2}


# -- the prompt stage and shadow runs, through a real router on the fake upstream ---------------------------------


APP = AppConfig(name="phones", model="smart", prompt=PromptRef(name=NAME, label="production"))


@dataclass
class Gateway:
    db: Database
    prompts: PromptService
    pipeline: Pipeline
    shadows: ShadowRunner
    accounting: Accounting
    ledger: BatchWriter[dict[str, Any]]

    async def ask(
        self, user: str, text: str = "hi", variables: dict[str, str] | None = None
    ) -> tuple[RequestContext, str | None]:
        """One app request as a route runs it (the pipeline, then the deferred work): its context and answer."""
        ctx = RequestContext(
            request_id=f"req_{user}_{time.monotonic_ns()}",
            route="test.app",
            body={"model": "smart", "messages": [{"role": "user", "content": text}], "user": user},
            public_model="smart",
            app=APP,
            variables=variables or {},
        )
        ctx.defer(self.accounting.record)
        answer = None
        try:
            result = await self.pipeline.chat(ctx)
        except KeelError as exc:
            ctx.fail(exc)
        else:
            assert isinstance(result, dict)
            ctx.usage = result["usage"]
            self.accounting.price(ctx)
            answer = result["choices"][0]["message"]["content"]
        await ctx.finish()
        return ctx, answer

    async def ledger_rows(self) -> list[dict[str, Any]]:
        await self.ledger.flush()
        columns = ("request_id", "route", "key_id", "prompt_version", "experiment_arm", "outcome")
        async with self.db.session() as s:
            rows = await s.scalars(select(SpendRecord).order_by(SpendRecord.id))
            return [{c: getattr(r, c) for c in columns} for r in rows]


@pytest.fixture
async def gateway(database: Database, fake: FakeUpstreamThread) -> AsyncIterator[Gateway]:
    models = "\n".join(
        f"  - {{name: {name}, model: up-{name}, api_base: '{fake.base_url}/v1', max_retries: 0, "
        "cooldown: {failures: 1000}}"
        for name in ("smart", "big")
    )
    config = parse_config(f"models:\n{models}\n", env={})
    client = UpstreamClient()
    router = Router(config, lambda d: build_provider(d, client))
    ledger: BatchWriter[dict[str, Any]] = BatchWriter(SpendRepository(database).insert_many, interval_s=60)
    accounting = Accounting(PriceBook(config.models), ledger)
    prompts = PromptService(database, ttl_s=0, known_models=router.names, rule=RollbackRule(min_requests=10))
    shadows = ShadowRunner(router, accounting)
    pipeline = Pipeline([PromptStage(ManagedSystemPrompt(prompts, shadows))], router)
    yield Gateway(database, prompts, pipeline, shadows, accounting, ledger)
    await shadows.aclose()
    await router.aclose()
    await client.aclose()
    await ledger.stop()


def system_of(request: dict[str, Any]) -> str:
    return str(request["body"]["messages"][0]["content"])


async def test_stage_renders_the_labelled_version_and_tags_the_request(
    gateway: Gateway, fake: FakeUpstreamThread
) -> None:
    prompts = gateway.prompts
    await prompts.push(NAME, content("You help {{ who }}.", who={}), by="alice")
    await prompts.push(
        NAME,
        PromptContent(system="v2 helps {{ who }}.", variables={"who": {}}, model="big", params={"temperature": 0.1}),
        by="alice",
    )
    await prompts.repo.set_label(NAME, "production", 1, by="alice")
    ctx, answer = await gateway.ask("u1", "What is USB-C?", {"who": "Ann"})
    assert answer == "Echo: What is USB-C?"
    assert ctx.response_headers["x-keel-prompt"] == f"{NAME}@1" and "x-keel-experiment-arm" not in ctx.response_headers
    assert (ctx.prompt_name, ctx.prompt_version, ctx.experiment_arm) == (NAME, 1, None)
    [sent] = fake.requests
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "You help Ann."},
        {"role": "user", "content": "What is USB-C?"},
    ]

    # Moving the label is the whole rollout: the next request uses v2, its model and its parameters.
    await prompts.repo.set_label(NAME, "production", 2, by="alice")
    ctx, _ = await gateway.ask("u1", "Again", {"who": "Ann"})
    assert ctx.public_model == "big" and ctx.response_headers["x-keel-prompt"] == f"{NAME}@2"
    sent = fake.requests[-1]["body"]
    assert (sent["model"], sent["temperature"], sent["messages"][0]["content"]) == ("up-big", 0.1, "v2 helps Ann.")

    with pytest.raises(InvalidRequest):
        await gateway.pipeline.chat(
            RequestContext(request_id="r", route="t", body={"messages": []}, public_model="smart", app=APP)
        )
    rows = await gateway.ledger_rows()
    assert [(r["prompt_version"], r["experiment_arm"]) for r in rows] == [(1, None), (2, None)]


async def test_shadow_runs_the_treatment_on_a_copy_and_the_client_sees_only_the_control(
    gateway: Gateway, fake: FakeUpstreamThread
) -> None:
    prompts = gateway.prompts
    await prompts.push(NAME, content("Control prompt."), by="alice")
    await prompts.push(NAME, content("Treatment prompt."), by="alice")
    await prompts.repo.set_label(NAME, "production", 1, by="alice")
    exp = await prompts.repo.start_experiment(NAME, "production", 2, 100, by="alice", shadow=True)
    fake.script({"content": "control answer"}, {"content": "shadow answer"})

    ctx, answer = await gateway.ask("u1", "Which phone?")
    assert answer == "control answer"
    assert ctx.response_headers["x-keel-prompt"] == f"{NAME}@1"
    assert ctx.response_headers["x-keel-experiment-arm"] == "control"
    await gateway.shadows.drain()
    primary, shadow = fake.requests
    assert system_of(primary) == "Control prompt." and system_of(shadow) == "Treatment prompt."
    assert primary["body"]["messages"][1:] == shadow["body"]["messages"][1:]
    assert shadow["body"]["stream"] is False
    rows = await gateway.ledger_rows()
    assert rows == [
        {
            "request_id": ctx.request_id,
            "route": "test.app",
            "key_id": None,
            "prompt_version": 1,
            "experiment_arm": "control",
            "outcome": "ok",
        },
        {
            "request_id": f"{ctx.request_id}:shadow",
            "route": "prompt.shadow",
            "key_id": None,
            "prompt_version": 2,
            "experiment_arm": "shadow",
            "outcome": "ok",
        },
    ]
    # A failing shadow never reaches the client either.
    fake.script({"content": "fine"}, {"status": 500})
    ctx, answer = await gateway.ask("u2", "Next?")
    await gateway.shadows.drain()
    assert answer == "fine" and ctx.status == 200
    assert (await gateway.ledger_rows())[-1]["outcome"] == "error"
    await prompts.repo.stop_experiment(exp.id, by="alice")
    await gateway.ask("u3")
    await gateway.shadows.drain()
    assert len(fake.requests) == 5


async def test_auto_rollback_moves_the_label_back_when_the_new_version_errors(
    gateway: Gateway, fake: FakeUpstreamThread
) -> None:
    prompts = gateway.prompts
    await prompts.push(NAME, content("Good prompt."), by="alice")
    await prompts.push(NAME, content("New prompt."), by="alice")
    await prompts.repo.set_label(NAME, "production", 1, by="alice")
    for i in range(10):
        assert (await gateway.ask(f"u{i}"))[0].status == 200
    await prompts.repo.set_label(NAME, "production", 2, by="bob")
    fake.script({"status": 500, "times": 4})
    statuses = [(await gateway.ask(f"u{i}"))[0].status for i in range(10)]
    assert statuses == [502] * 4 + [200] * 6
    await gateway.ledger.flush()

    [event] = await prompts.check_rollbacks()
    assert (event.kind, event.from_version, event.to_version) == ("label", 2, 1)
    assert "40.0% of 10 requests" in event.reason
    [move, *_] = await prompts.repo.history(NAME, "production")
    assert (move.action, move.changed_by, move.to_version, move.reason) == (
        "auto-rollback",
        AUTO_ROLLBACK,
        1,
        event.reason,
    )
    assert (await gateway.ask("u1"))[0].response_headers["x-keel-prompt"] == f"{NAME}@1"
    assert await prompts.check_rollbacks() == []  # the rolled-back move is not judged again


# -- caching, the store going away, bundled fallbacks ------------------------------------------------------------


async def test_a_label_move_reaches_every_worker_within_the_ttl(database: Database) -> None:
    admin = PromptService(database)
    await push(admin, "One")
    await push(admin, "Two")
    await admin.repo.set_label(NAME, "production", 1, by="alice")
    worker = PromptService(database, ttl_s=0.3)
    calls = 0
    fetch = worker.repo.label_state

    async def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await fetch(*args)

    worker.repo.label_state = counting
    resolved = await asyncio.gather(*(worker.resolve(NAME) for _ in range(20)))  # concurrent misses: one fetch
    assert {r.version for r in resolved} == {1} and calls == 1
    for _ in range(20):
        assert (await worker.resolve(NAME)).version == 1
    assert calls == 1
    await admin.repo.set_label(NAME, "production", 2, by="alice")
    assert (await worker.resolve(NAME)).version == 1  # cached
    await asyncio.sleep(0.35)
    assert (await worker.resolve(NAME)).version == 2 and calls == 2


def write_fallbacks(directory: Path) -> Path:
    directory.mkdir()
    (directory / "assistant.yaml").write_text(
        "name: assistant\nvariables: {who: {default: you}}\nsystem: 'Bundled prompt for {{ who }}.'\n"
    )
    return directory


async def break_database(database: Database, request: pytest.FixtureRequest) -> None:
    """Make the store unusable for real: drop the PostgreSQL database, or replace the SQLite file with an empty one."""
    name = database.engine.url.database
    assert name
    if database.dialect == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        server.psql("postgres", f"DROP DATABASE {name} WITH (FORCE)")
    else:
        await database.dispose()
        for suffix in ("", "-wal", "-shm"):
            await asyncio.to_thread(Path(name + suffix).unlink, missing_ok=True)


async def test_store_down_serves_last_known_then_the_bundled_fallback(
    database: Database, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fallbacks = write_fallbacks(tmp_path / "prompts")
    worker = PromptService(database, fallbacks, ttl_s=0, fetch_timeout_s=2)
    await worker.push(NAME, content("Stored v1 for {{ who }}.", who={}), by="alice")
    await worker.push("other", content("Other."), by="alice")
    for name in (NAME, "other"):
        await worker.repo.set_label(name, "production", 1, by="alice")
    assert (await worker.resolve(NAME)).source == "store"
    await worker.resolve("other")

    await break_database(database, request)
    t0 = time.perf_counter()
    last = await worker.resolve(NAME)
    assert (last.source, last.version) == ("last-known", 1)
    assert worker.render(last, {"who": "Ann"}) == [{"role": "system", "content": "Stored v1 for Ann."}]
    assert (await worker.resolve("other")).source == "last-known"
    # A worker that starts while the store is down has nothing cached: the bundled file is served.
    fresh = PromptService(database, fallbacks, ttl_s=0, fetch_timeout_s=2)
    bundled = await fresh.resolve(NAME, user_id="u1")
    assert (bundled.source, bundled.version, bundled.prompt.ref) == ("fallback", None, f"{NAME}@fallback")
    assert fresh.render(bundled, {}) == [{"role": "system", "content": "Bundled prompt for you."}]
    with pytest.raises(KeelError) as exc:
        await fresh.resolve("other")
    assert exc.value.status == 503 and exc.value.code == "prompt_store_unavailable"
    assert time.perf_counter() - t0 < 5


async def test_a_label_never_set_is_served_from_the_bundled_file_or_is_a_404(
    database: Database, tmp_path: Path
) -> None:
    service = PromptService(database, write_fallbacks(tmp_path / "prompts"))
    resolved = await service.resolve(NAME, "production")
    assert (resolved.source, resolved.version) == ("fallback", None)
    with pytest.raises(NotFound) as exc:
        await service.resolve("unknown", "production")
    assert "keel prompts push" in exc.value.message


def test_the_sample_app_prompt_file_is_valid() -> None:
    [sample] = load_prompt_dir(Path(__file__).resolve().parents[2] / "examples" / "phone-assistant" / "prompts")
    template = CompiledPrompt(sample.content(), f"{sample.name}@fallback")
    [message] = template.render({"context": "[s1] The Pixel 9 has a 4700 mAh battery.", "today": "2026-11-24"})
    assert "[s1] The Pixel 9" in message["content"] and "Today is 2026-11-24." in message["content"]
    [message] = template.render({})
    assert "do not know" in message["content"] and "Today is" not in message["content"]
