"""The guardrail runner: concurrency, timeouts, failure policies, how findings combine, redaction merging, and
building runners from config (registry, option errors)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from keel.config import ConfigError, load_config, parse_config
from keel.guard.base import Action, Finding, GuardInput, Span
from keel.guard.registry import build_guards
from keel.guard.rules import SizeCheck
from keel.guard.runner import UNAVAILABLE, ConfiguredCheck, GuardRunner, merge_spans, redact
from keel.observe.metrics import GUARD_OUTCOMES


class Sleepy:
    """A check that takes ``seconds`` and then finds ``findings``."""

    name = "sleepy"

    def __init__(self, seconds: float, findings: list[Finding] | None = None) -> None:
        self.seconds = seconds
        self.findings = findings or []
        self.cancelled = False

    async def check(self, inp: GuardInput) -> list[Finding]:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return list(self.findings)


class Broken:
    name = "broken"

    async def check(self, inp: GuardInput) -> list[Finding]:
        raise RuntimeError("the classifier is down")


class Finds:
    """Finds each given word, with its span, as entity ``WORD``."""

    name = "finds"

    def __init__(self, *words: str, reason: str = "found", score: float | None = None) -> None:
        self.words = words
        self.reason = reason
        self.score = score

    async def check(self, inp: GuardInput) -> list[Finding]:
        out = []
        for w in self.words:
            at = inp.text.find(w)
            if at >= 0:
                span = Span(at, at + len(w), "WORD")
                out.append(Finding("finds", self.reason, f"a word of {len(w)} letters", self.score, (span,)))
        return out


def configured(
    label: str, check: object, action: Action = "block", timeout_s: float = 1.0, on_error: str = "closed"
) -> ConfiguredCheck:
    return ConfiguredCheck(label, check, action, timeout_s, on_error)  # type: ignore[arg-type]


def text(s: str) -> GuardInput:
    return GuardInput(s, "input", app="test")


class Meeting:
    """A check that finishes only once every check sharing its ``arrived`` list has started: checks run one after
    the other would wait out their timeout."""

    name = "meeting"

    def __init__(self, arrived: list[str], everyone: asyncio.Event, size: int) -> None:
        self.arrived, self.everyone, self.size = arrived, everyone, size

    async def check(self, inp: GuardInput) -> list[Finding]:
        self.arrived.append("here")
        if len(self.arrived) == self.size:
            self.everyone.set()
        await self.everyone.wait()
        await asyncio.sleep(0.05)
        return []


async def test_checks_run_concurrently() -> None:
    arrived: list[str] = []
    everyone = asyncio.Event()
    checks = [configured(label, Meeting(arrived, everyone, 2), timeout_s=5) for label in ("a", "b")]
    verdict = await GuardRunner("test", "input", checks).run(text("hello"))
    assert verdict.allowed and verdict.action == "allow", verdict.blocking
    assert set(verdict.checks) == {"a", "b"} and all(ms >= 45 for ms in verdict.checks.values())
    assert verdict.latency_ms >= max(verdict.checks.values())


async def test_timeout_follows_on_error(caplog: pytest.LogCaptureFixture) -> None:
    slow_closed = Sleepy(5)
    runner = GuardRunner("test", "input", [configured("slow", slow_closed, timeout_s=0.05)])
    before = GUARD_OUTCOMES.labels("slow", "input", "timeout")._value.get()
    with caplog.at_level(logging.WARNING, logger="keel.guard"):
        started = time.perf_counter()
        verdict = await runner.run(text("hello"))
    assert time.perf_counter() - started < 0.5
    assert slow_closed.cancelled
    assert not verdict.allowed and verdict.action == "block"
    assert verdict.blocking == [
        {"check": "slow", "reason": UNAVAILABLE, "detail": "the slow check timed out after 50 ms"}
    ]
    assert GUARD_OUTCOMES.labels("slow", "input", "timeout")._value.get() == before + 1
    assert any("guardrail unavailable, blocked" in r.getMessage() for r in caplog.records)

    caplog.clear()
    runner = GuardRunner("test", "input", [configured("slow", Sleepy(5), timeout_s=0.05, on_error="open")])
    with caplog.at_level(logging.WARNING, logger="keel.guard"):
        verdict = await runner.run(text("hello"))
    assert verdict.allowed and verdict.action == "allow" and verdict.reasons == []
    assert any("guardrail unavailable, let through" in r.getMessage() for r in caplog.records)  # never silent


async def test_errors_follow_on_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="keel.guard"):
        closed = await GuardRunner("test", "input", [configured("broken", Broken())]).run(text("x"))
        opened = await GuardRunner("test", "input", [configured("broken", Broken(), on_error="open")]).run(text("x"))
    assert closed.action == "block" and closed.blocking[0]["reason"] == UNAVAILABLE
    assert closed.blocking[0]["detail"] == "the broken check failed"  # the exception stays in the log
    assert opened.action == "allow"
    logged = [r.__dict__["fields"]["detail"] for r in caplog.records if "fields" in r.__dict__]
    assert all("RuntimeError: the classifier is down" in d for d in logged) and len(logged) == 2


async def test_actions_combine_block_beats_redact_beats_warn(caplog: pytest.LogCaptureFixture) -> None:
    runner = GuardRunner(
        "test",
        "input",
        [
            configured("warner", Finds("hello", reason="greeting", score=0.51234), action="warn"),
            configured("masker", Finds("secret"), action="redact"),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="keel.guard"):
        verdict = await runner.run(text("hello, my secret is here"))
    assert verdict.allowed and verdict.action == "redact"
    assert verdict.text == "hello, my <WORD> is here"
    assert verdict.reasons == [
        {"check": "warner", "reason": "greeting", "detail": "a word of 5 letters", "score": 0.5123, "action": "warn"},
        {"check": "masker", "reason": "found", "detail": "a word of 6 letters", "action": "redact"},
    ]
    assert any("guardrail warning: greeting" in r.getMessage() for r in caplog.records)

    warn_only = await GuardRunner("test", "input", [configured("w", Finds("hello"), action="warn")]).run(text("hello"))
    assert warn_only.allowed and warn_only.action == "warn" and warn_only.text == "hello"

    runner = GuardRunner(
        "test", "input", [configured("masker", Finds("secret"), action="redact"), configured("b", Finds("bomb"))]
    )
    blocked = await runner.run(text("a secret bomb"))
    assert not blocked.allowed and blocked.action == "block"
    assert blocked.text == "a <WORD> bomb"  # never echoes what was masked, even when blocked
    assert blocked.blocking == [{"check": "b", "reason": "found", "detail": "a word of 4 letters"}]


async def test_redact_without_spans_blocks() -> None:
    class NoSpans:
        name = "nospans"

        async def check(self, inp: GuardInput) -> list[Finding]:
            return [Finding("nospans", "prompt_injection", "looks like an injection")]

    verdict = await GuardRunner("test", "input", [configured("n", NoSpans(), action="redact")]).run(text("x"))
    assert verdict.action == "block"


async def test_no_findings_and_no_checks() -> None:
    verdict = await GuardRunner("test", "output", [configured("f", Finds("nothing"))]).run(text("all good"))
    assert verdict.allowed and verdict.action == "allow" and verdict.text == "all good" and verdict.reasons == []
    empty = await GuardRunner("test", "output", []).run(text("all good"))
    assert empty.allowed and empty.checks == {}


def test_merge_spans() -> None:
    spans = [Span(10, 20, "EMAIL_ADDRESS"), Span(0, 4, "PERSON"), Span(15, 30, "URL"), Span(30, 35, "PHONE_NUMBER")]
    merged = merge_spans(spans, 33)
    # overlapping spans become one (the longer one names it); touching spans stay apart; clipped to the text
    assert merged == [Span(0, 4, "PERSON"), Span(10, 30, "URL"), Span(30, 33, "PHONE_NUMBER")]
    assert merge_spans([Span(5, 5, "X"), Span(50, 60, "Y")], 10) == []
    assert merge_spans([Span(2, 8, "A"), Span(3, 5, "B")], 10) == [Span(2, 8, "A")]  # nested
    text = "Ada wrote to ada@example.com and +33 6 12 34 56 78."
    masked = redact(text, merge_spans([Span(13, 28, "EMAIL_ADDRESS"), Span(33, 50, "PHONE_NUMBER")], len(text)))
    assert masked == "Ada wrote to <EMAIL_ADDRESS> and <PHONE_NUMBER>."


async def test_overlapping_findings_of_two_checks_are_masked_once() -> None:
    runner = GuardRunner(
        "test",
        "input",
        [configured("a", Finds("555-0100"), action="redact"), configured("b", Finds("call 555"), action="redact")],
    )
    verdict = await runner.run(text("please call 555-0100 now"))
    assert verdict.text == "please <WORD> now"


# -- building from config ----------------------------------------------------------------------------------------

MODELS = """
models:
  - {name: m, model: up}
"""


def config(guardrails: str) -> str:
    return MODELS + "apps:\n  - name: shop\n    model: m\n    guardrails:\n" + guardrails


def test_build_from_config_shares_equal_checks_and_labels_repeats() -> None:
    cfg = parse_config(
        config(
            """
      input:
        - {check: size, max_chars: 100, timeout_ms: 50, on_error: open}
        - {check: size, max_chars: 10, action: warn}
      output:
        - {check: size, max_chars: 100}
        - {check: unsafe_content}
      refusal: No can do.
      stream_window_chars: 200
"""
        ),
        env={},
    )
    guards = build_guards(cfg)["shop"]
    assert guards.refusal == "No can do." and guards.window_chars == 200
    assert guards.input is not None and guards.output is not None
    first, second = guards.input.checks
    assert (first.label, first.action, first.timeout_s, first.on_error) == ("size", "block", 0.05, "open")
    assert (second.label, second.action, second.on_error) == ("size#2", "warn", "closed")
    assert isinstance(first.check, SizeCheck) and first.check.max_chars == 100
    assert guards.output.checks[0].check is first.check  # same check and options: built once
    assert build_guards(parse_config(MODELS + "apps:\n  - {name: plain, model: m}\n", env={})) == {}


def test_unknown_check_names_fail_at_load() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config("      input:\n        - {check: pi}\n"), env={})
    assert "apps[0].guardrails.input[0].check: unknown check 'pi' (did you mean 'pii'?)" in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{check: size, max_char: 5}",
            "apps[0].guardrails.output[0]: check 'size': unknown option 'max_char' (did you mean 'max_chars'?); "
            "its options are: max_chars, max_tokens",
        ),
        ("{check: size}", "apps[0].guardrails.output[0]: check 'size': give `max_chars`, `max_tokens` or both"),
        ("{check: size, max_chars: -3}", "`max_chars` must be a positive integer (got -3)"),
        (
            "{check: unsafe_content, categories: [sql]}",
            "`categories`: choose among destructive_command, code_execution",
        ),
        ("{check: system_prompt_leak, min_ratio: 2}", "`min_ratio` must be a number in (0, 1] (got 2)"),
    ],
)
def test_bad_options_fail_at_start_naming_the_key(entry: str, message: str) -> None:
    cfg = parse_config(config(f"      output:\n        - {entry}\n"), env={})
    with pytest.raises(ConfigError) as err:
        build_guards(cfg)
    assert message in str(err.value)


def test_policy_keys_are_validated_by_the_config() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            config("      input:\n        - {check: size, max_chars: 5, action: drop, on_error: maybe}\n"), env={}
        )
    text = str(err.value)
    assert "apps[0].guardrails.input[0].action" in text and "apps[0].guardrails.input[0].on_error" in text


def test_the_sample_apps_guardrails_build() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "phone-assistant" / "keel.yaml")
    guards = build_guards(cfg)["phone-assistant"]
    assert guards.input is not None and guards.output is not None
    assert [c.label for c in guards.input.checks] == ["size", "injection", "pii", "topic"]
    assert [c.label for c in guards.output.checks] == ["unsafe_content", "system_prompt_leak", "pii", "contact_details"]
    assert guards.input.checks[2].check is guards.output.checks[2].check  # one PII check serves both directions
