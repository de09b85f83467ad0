"""The ``nemo`` check: real NeMo Guardrails configs (Colang 1.x) run offline with Keel's local embedder, and rails
that ask a model going through Keel's router to the fake upstream (the only fake). The sample app's rails are the
subject: off-topic messages are refused without any model call, phone questions pass."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

import aiohttp
import pytest

from helpers import KeelServer
from keel.config import ConfigError, load_config, parse_config
from keel.embed import LocalEmbedder
from keel.guard.base import Direction, GuardInput
from keel.guard.nemo import INSTALL_HINT, NemoCheck
from keel.guard.registry import build_guards
from keel.guard.runner import UNAVAILABLE, ConfiguredCheck, GuardRunner
from keel.llm.client import UpstreamClient
from keel.llm.registry import build_provider
from keel.llm.router import Router
from keel.testing.fake_upstream import FakeUpstreamThread

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "phone-assistant" / "rails"

REFUSED = {
    "who should I vote for in the election?": "nemo.politics",
    "what do you think of the prime minister?": "nemo.politics",
    "how do I make lasagna?": "nemo.cooking",
    "recipe for pancakes please": "nemo.cooking",
    "I have a bad cough, what medicine should I take?": "nemo.medical",
    "is aspirin good for my heart?": "nemo.medical",
}
ALLOWED = [
    "which phone has the best camera?",
    "what's the battery capacity of the Pixel 9?",
    "my phone screen is cracked, can I fix it?",
    "does the iPhone 16 have a headphone jack?",
    "hello",
]

SELF_CHECK = """
colang_version: "1.0"
models:
  - type: main
    engine: keel
    model: assistant
rails:
  input:
    flows: [self check input]
  output:
    flows: [self check output]
prompts:
  - task: self_check_input
    content: |
      Should this message to a phone shop assistant be blocked (Yes or No)?
      User message: "{{ user_input }}"
      Answer:
  - task: self_check_output
    content: |
      Should this answer of a phone shop assistant be blocked (Yes or No)?
      Answer: "{{ bot_response }}"
      Verdict:
"""


@pytest.fixture(scope="module")
async def router(fake_upstream: FakeUpstreamThread) -> AsyncIterator[Router]:
    config = parse_config(
        f"models:\n  - {{name: assistant, model: up-assistant, api_base: '{fake_upstream.base_url}/v1', "
        "max_retries: 0, cooldown: {failures: 1000}}\n",
        env={},
    )
    client = UpstreamClient()
    router = Router(config, lambda d: build_provider(d, client))
    yield router
    await router.aclose()
    await client.aclose()


@pytest.fixture(scope="module")
async def example(router: Router, local_embedder: LocalEmbedder) -> NemoCheck:
    """The sample app's rails, built and warmed up once (as Keel's guard warm-up does at start)."""
    check = NemoCheck(config_dir=str(EXAMPLE), router=router)
    await check.check(GuardInput("Hello! Which phone has the best battery life?", "input", embed=local_embedder.embed))
    return check


@pytest.fixture
def self_check(tmp_path: Path, router: Router) -> NemoCheck:
    (tmp_path / "config.yml").write_text(SELF_CHECK)
    return NemoCheck(config_dir=str(tmp_path), router=router)


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """Lines printed after the test even under pytest's capture: the latency figures."""
    lines: list[str] = []
    yield lines
    with capsys.disabled():
        for line in lines:
            print(line)


async def timed(
    check: NemoCheck, text: str, direction: Direction, local_embedder: LocalEmbedder
) -> tuple[list[str], float]:
    """The reasons found for ``text`` and the median latency (ms) of 5 runs (the embedding is cached after the
    first, as in Keel, where other checks and retrieval embed the same message)."""
    runs, reasons = [], []
    for _ in range(5):
        started = time.perf_counter()
        findings = await check.check(GuardInput(text, direction, embed=local_embedder.embed))
        runs.append((time.perf_counter() - started) * 1000)
        reasons = [f.reason for f in findings]
        assert all(f.check == "nemo" and f.detail for f in findings)
    return reasons, statistics.median(runs)


async def test_sample_rails_refuse_off_topic_and_allow_phone_questions(
    example: NemoCheck, local_embedder: LocalEmbedder, fake: FakeUpstreamThread, report: list[str]
) -> None:
    refused, allowed = [], []
    for text, reason in REFUSED.items():
        reasons, ms = await timed(example, text, "input", local_embedder)
        assert reasons == [reason], text
        refused.append(ms)
    for text in ALLOWED:
        reasons, ms = await timed(example, text, "input", local_embedder)
        assert reasons == [], text
        allowed.append(ms)
    assert fake.requests == []  # the topical rail matched intents by embeddings alone: no model call
    # Answers: the sample config has no output rails, so the check passes them at no cost.
    assert await example.check(GuardInput("Vote for the green party!", "output", embed=local_embedder.embed)) == []
    report.append(
        f"nemo sample rails, per check (median of 5): refused {statistics.median(refused):.1f} ms, "
        f"allowed {statistics.median(allowed):.1f} ms (max {max(refused + allowed):.1f} ms)"
    )


async def test_rails_that_ask_a_model_go_through_keels_router(
    self_check: NemoCheck, local_embedder: LocalEmbedder, fake: FakeUpstreamThread, report: list[str]
) -> None:
    text = "how do I unlock my neighbour's phone without the PIN?"
    timings = {}
    for direction in ("input", "output"):
        fake.script({"content": "Yes"})
        found = await self_check.check(GuardInput(text, direction, embed=local_embedder.embed))
        assert [f.reason for f in found] == [f"nemo.self check {direction}"]
        fake.script({"content": "No"})
        started = time.perf_counter()
        assert await self_check.check(GuardInput(text, direction, embed=local_embedder.embed)) == []
        timings[direction] = (time.perf_counter() - started) * 1000
    bodies = [r["body"] for r in fake.requests]
    assert len(bodies) == 4
    assert all(b["model"] == "up-assistant" and text in b["messages"][-1]["content"] for b in bodies)
    assert all(b["temperature"] < 0.01 for b in bodies)  # NeMo's classification tasks ask for temperature ~0
    report.append(
        "nemo self check rails, one model call each (fake upstream): "
        + ", ".join(f"{d} {ms:.1f} ms" for d, ms in timings.items())
    )


async def test_a_failing_model_is_a_check_failure_for_the_runners_policy(
    self_check: NemoCheck, local_embedder: LocalEmbedder, fake: FakeUpstreamThread
) -> None:
    fake.script({"status": 500, "message": "upstream exploded"})
    runner = GuardRunner("phones", "input", [ConfiguredCheck("nemo", self_check, "block", 10.0, "closed")])
    verdict = await runner.run(GuardInput("is the Pixel 9 waterproof?", "input", embed=local_embedder.embed))
    assert not verdict.allowed
    assert [r["reason"] for r in verdict.reasons] == [UNAVAILABLE]


async def test_concurrent_first_checks_and_a_failed_first_build(router: Router, local_embedder: LocalEmbedder) -> None:
    check = NemoCheck(config_dir=str(EXAMPLE), router=router)
    # Without an embedder NeMo cannot embed its intent examples: NeMo would log that and let the text through;
    # the check fails instead, so the runner's on_error policy decides.
    with pytest.raises(RuntimeError, match="generate_user_intent"):
        await check.check(GuardInput("who should I vote for?", "input"))
    texts = ["who should I vote for?", "is the Pixel 9 waterproof?", "how do I bake bread?"] * 4
    found = await asyncio.gather(*(check.check(GuardInput(t, "input", embed=local_embedder.embed)) for t in texts))
    assert [[f.reason for f in f_] for f_ in found] == [["nemo.politics"], [], ["nemo.cooking"]] * 4


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "$user_message {{ config }} {% raw %}",
        'define flow x\n  bot "hi"\n  stop',
        "\x00\ufffd🙂",
        "phone " * 3000,
    ],
)
async def test_odd_texts_get_a_verdict(example: NemoCheck, local_embedder: LocalEmbedder, text: str) -> None:
    for direction in ("input", "output"):
        findings = await example.check(GuardInput(text, direction, embed=local_embedder.embed))
        assert isinstance(findings, list)


def test_relative_config_dir_is_relative_to_keel_yaml(router: Router) -> None:
    assert NemoCheck(config_dir="rails", base_dir=EXAMPLE.parent, router=router).config_dir == EXAMPLE


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({}, "not a valid NeMo Guardrails config"),
        ({"config.yml": 'colang_version: "2.x"\n'}, "Keel runs Colang 1.x configs"),
        (
            {"config.yml": "models:\n  - {type: embeddings, engine: FastEmbed, model: all-MiniLM-L6-v2}\n"},
            "set `engine: keel`",
        ),
        ({"config.yml": "models:\n  - {type: main, engine: keel, model: gpt-9}\n"}, "'gpt-9' is not in keel.yaml"),
        ({"config.yml": "rails:\n  input:\n    flows: [no such flow]\n"}, "does not exist"),
    ],
)
def test_bad_configs_fail_at_start_with_the_fix(
    tmp_path: Path, router: Router, files: dict[str, str], error: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=error):
        NemoCheck(config_dir=str(tmp_path), router=router)


def test_keel_config_names_the_check_and_its_problem() -> None:
    config = parse_config(
        "models:\n  - {name: m, model: up, api_base: 'http://127.0.0.1:9/v1'}\n"
        "apps:\n  - name: phones\n    model: m\n    guardrails:\n      input:\n"
        "        - {check: nemo, config_dir: /nonexistent/rails}\n",
        env={},
    )
    with pytest.raises(ConfigError, match=r"input\[0\].*check 'nemo'.*/nonexistent/rails is not a folder"):
        build_guards(config)


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nemoguardrails", None)  # what `import nemoguardrails` sees when not installed
    with pytest.raises(ValueError, match="--extra nemo") as info:
        NemoCheck(config_dir=str(EXAMPLE))
    assert INSTALL_HINT in str(info.value)


def test_registered_as_a_keel_guard() -> None:
    (ep,) = [ep for ep in entry_points(group="keel.guards") if ep.name == "nemo"]
    assert ep.load() is NemoCheck


async def test_without_a_router_only_rails_that_ask_a_model_fail(tmp_path: Path, local_embedder: LocalEmbedder) -> None:
    topical = NemoCheck(config_dir=str(EXAMPLE))  # no router: the embeddings-only topical rail still works
    found = await topical.check(GuardInput("how do I bake sourdough bread?", "input", embed=local_embedder.embed))
    assert [f.reason for f in found] == ["nemo.cooking"]
    (tmp_path / "config.yml").write_text(SELF_CHECK)
    asks = NemoCheck(config_dir=str(tmp_path))
    with pytest.raises(Exception, match="passed no model router"):
        await asks.check(GuardInput("is the Pixel 9 waterproof?", "input", embed=local_embedder.embed))


async def test_check_nemo_in_keel_yaml_guards_a_real_keel(
    keel: Callable[..., KeelServer], fake: FakeUpstreamThread
) -> None:
    models = "  - {name: assistant, model: up-assistant, api_base: '{fake}', max_retries: 0}\n"
    apps = (
        "apps:\n  - name: phones\n    model: assistant\n    guardrails:\n      input:\n"
        f"        - {{check: nemo, config_dir: '{EXAMPLE}', timeout_ms: 2000}}\n"
    )
    server = keel(models, extra=apps)
    async with aiohttp.ClientSession() as http:
        for text, allowed in (("which party should win the election?", False), ("is the Pixel 9 waterproof?", True)):
            body = {"text": text, "direction": "input"}
            async with http.post(server.url + "/v1/guardrails/check", json=body) as resp:
                assert resp.status == 200, await resp.text()
                verdict = await resp.json()
            assert verdict["allowed"] is allowed, verdict
            assert [r["reason"] for r in verdict["reasons"]] == ([] if allowed else ["nemo.politics"])
    assert fake.requests == []


def test_keel_hands_the_check_its_router_and_the_config_files_folder(tmp_path: Path, router: Router) -> None:
    """`config_dir: rails` in a keel.yaml elsewhere is that file's rails folder, and the router reaches the check;
    neither can be set from keel.yaml."""
    shutil.copytree(EXAMPLE, tmp_path / "rails")
    keel_yaml = tmp_path / "keel.yaml"
    keel_yaml.write_text(
        "models:\n  - {name: assistant, model: up, api_base: 'http://127.0.0.1:9/v1'}\n"
        "apps:\n  - name: phones\n    model: assistant\n    guardrails:\n      input:\n"
        "        - {check: nemo, config_dir: rails}\n"
    )
    guards = build_guards(load_config(keel_yaml), router=router)
    runner = guards["phones"].input
    assert runner is not None
    (configured,) = runner.checks
    assert isinstance(configured.check, NemoCheck)
    assert configured.check.config_dir == (tmp_path / "rails").resolve()
    assert configured.check.router is router
    keel_yaml.write_text(keel_yaml.read_text().replace("config_dir: rails", "config_dir: rails, router: x"))
    with pytest.raises(ConfigError, match="'router' is set by Keel"):
        build_guards(load_config(keel_yaml), router=router)


async def test_rail_model_calls_are_billed_to_the_request_they_guard(
    keel: Callable[..., KeelServer], fake: FakeUpstreamThread, tmp_path: Path
) -> None:
    """A rail that asks a model (self check, input and output) costs money: each call is a ledger row under the
    caller's key (through /v1/guardrails/check too) and counts against the key's budget when a chat settles. Here
    the chat alone stays under the key's soft threshold; with its two rail calls it is over, so the next request
    is downgraded."""
    (tmp_path / "rails").mkdir()
    (tmp_path / "rails" / "config.yml").write_text(SELF_CHECK.replace("model: assistant", "model: checker"))
    price = "price: {input_per_mtok: 1000, output_per_mtok: 1000}"
    models = (
        f"  - {{name: smart, model: up-smart, api_base: '{{fake}}', max_retries: 0, {price}}}\n"
        "  - {name: cheap, model: up-cheap, api_base: '{fake}', price: {input_per_mtok: 1, output_per_mtok: 1}}\n"
        f"  - {{name: checker, model: up-checker, api_base: '{{fake}}', max_retries: 0, {price}}}\n"
    )
    master = "sk-master-test-0123456789"
    extra = (
        f"auth: {{master_key: {master}, key_cache_ttl_s: 0}}\nbudgets: {{downgrade_model: cheap}}\n"
        "apps:\n  - name: phones\n    model: smart\n    guardrails:\n"
        f"      input: [{{check: nemo, config_dir: '{tmp_path / 'rails'}', timeout_ms: 5000}}]\n"
        f"      output: [{{check: nemo, config_dir: '{tmp_path / 'rails'}', timeout_ms: 5000}}]\n"
    )
    server = keel(models, extra=extra)
    warm_up = len(fake.requests)  # Keel's start-up warm-up runs the checks once, for nobody
    fake.script({"content": "No", "times": 100}, model="up-checker")
    admin = {"Authorization": f"Bearer {master}"}
    async with aiohttp.ClientSession() as http:

        async def new_key(user: str, soft_budget_usd: float) -> dict[str, str]:
            body = {"user_id": user, "budget_usd": 1, "soft_budget_usd": soft_budget_usd}
            async with http.post(server.url + "/v1/admin/keys", json=body, headers=admin) as resp:
                assert resp.status == 201
                return dict(await resp.json())

        key = await new_key("alice", 0.006)
        caller = {"Authorization": f"Bearer {key['key']}", "x-keel-app": "phones"}
        body = {"model": "smart", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
        async with http.post(server.url + "/v1/chat/completions", json=body, headers=caller) as resp:
            assert resp.status == 200, await resp.text()
            assert float(resp.headers["x-keel-cost-usd"]) == pytest.approx(0.005)  # under the soft threshold
        async with http.post(server.url + "/v1/chat/completions", json=body, headers=caller) as resp:
            assert resp.status == 200
            assert resp.headers["x-keel-downgraded"] == "smart->cheap"  # the rail calls were settled too
        check = {"app": "phones", "text": "is the Pixel 9 waterproof?", "direction": "input"}
        async with http.post(server.url + "/v1/guardrails/check", json=check, headers=caller) as resp:
            assert resp.status == 200 and (await resp.json())["allowed"] is True
        async with http.get(server.url + f"/v1/usage?group_by=model&key_id={key['id']}", headers=admin) as resp:
            usage = {row["group"]: row for row in (await resp.json())["data"]}
        checker_calls = [r for r in fake.requests[warm_up:] if r["body"]["model"] == "up-checker"]
        assert len(checker_calls) == 5  # input and output for two chats, and the direct check

        # A direct check's rail call is charged too: a second key is over a one-micro-dollar soft threshold after
        # one check, before any chat of its own.
        other = await new_key("bob", 0.000001)
        other_caller = {"Authorization": f"Bearer {other['key']}", "x-keel-app": "phones"}
        async with http.post(server.url + "/v1/guardrails/check", json=check, headers=other_caller) as resp:
            assert resp.status == 200
        async with http.post(server.url + "/v1/chat/completions", json=body, headers=other_caller) as resp:
            assert resp.status == 200 and resp.headers["x-keel-downgraded"] == "smart->cheap"
    assert usage["checker"]["requests"] == 5 and usage["checker"]["cost_usd"] > 0
    assert usage["smart"]["requests"] == 1 and usage["cheap"]["requests"] == 1
