"""The topical rail with the real local embedder, configured like a smartphone assistant: politics, cooking,
medicine and the like are refused; phone questions, greetings and short follow-ups are let through."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.embed import LocalEmbedder
from keel.guard.base import GuardInput
from keel.guard.topic import TopicCheck

ALLOWED = [
    "Which phone has the best battery life?",
    "How fast does the Pixel 8 charge?",
    "Does this phone support wireless charging?",
    "What chip does the iPhone 15 Pro use?",
    "How much RAM and storage does it have?",
    "Which phone has the best camera?",
    "What is the screen size and refresh rate?",
    "Is the phone waterproof? What is its IP rating?",
    "How much does the Galaxy S24 cost?",
    "Compare the Pixel 8 and the Galaxy S23.",
    "Recommend a phone under $400.",
    "How many years of software updates does it get?",
    "Does it have a headphone jack or a microSD slot?",
    "Does it support eSIM, 5G and NFC?",
    "How do I make my phone battery last longer?",
    "Is fast charging bad for the battery?",
    "How do I transfer data to a new phone?",
    "How do I factory reset my Android phone?",
    "How do I find my lost phone?",
    "My phone overheats, what should I do?",
    "iPhone vs Android: which should I choose?",
    "Tell me about the Nothing Phone 2.",
]
OFF_TOPIC = [
    "Who should I vote for in the next election?",
    "What do you think about the government's immigration policy?",
    "Give me a recipe for lasagna.",
    "How long do I bake a chocolate cake?",
    "I have chest pain and a fever, what medicine should I take?",
    "What are the symptoms of diabetes?",
    "Can my landlord raise the rent without notice?",
    "Which stocks should I buy this year?",
    "Book me a flight to Rome next Friday.",
    "Write my history essay about the French Revolution.",
]
ON_TOPIC = [
    "What battery capacity does the Pixel 8 have?",
    "Is the iPhone 15 Pro Max worth the upgrade from the 13?",
    "Which Samsung phones have the best zoom camera?",
    "Does the OnePlus 12 support wireless charging?",
    "Best phone for a teenager under 300 euros?",
    "How do I take a screenshot on a Galaxy?",
    "Why is my iPhone battery draining so fast after the update?",
    # greetings, thanks and short follow-ups that only make sense in a conversation
    "hi",
    "Hello! Can you help me?",
    "thanks!",
    "ok, bye",
    "and its battery?",
    "what about the Pro model?",
    "how much is it?",
    "are you a bot?",
]


@pytest.fixture(scope="module")
def check() -> TopicCheck:
    return TopicCheck(allowed=ALLOWED, denied=["Tell me who won the football match."])


def inp(text: str, local_embedder: LocalEmbedder) -> GuardInput:
    return GuardInput(text, "input", embed=local_embedder.embed)


@pytest.mark.parametrize("text", OFF_TOPIC)
async def test_off_topic_requests_are_flagged(check: TopicCheck, local_embedder: LocalEmbedder, text: str) -> None:
    result = await check.check(inp(text, local_embedder))
    assert [f.reason for f in result] == ["off_topic"]
    assert text not in result[0].detail


@pytest.mark.parametrize("text", ON_TOPIC)
async def test_phone_questions_and_small_talk_pass(check: TopicCheck, local_embedder: LocalEmbedder, text: str) -> None:
    assert await check.check(inp(text, local_embedder)) == [], await check.scores(inp(text, local_embedder))


async def test_app_denied_examples_are_used(local_embedder: LocalEmbedder) -> None:
    text = "Which football team won the league?"
    scores = await TopicCheck(allowed=ALLOWED, denied=["Who won the football match yesterday?"]).scores(
        inp(text, local_embedder)
    )
    assert scores.closest_denied == "denied example 1"


async def test_without_the_defaults_only_the_threshold_and_app_examples_decide(local_embedder: LocalEmbedder) -> None:
    bare = TopicCheck(allowed=ALLOWED, default_denied=False, chitchat=False, threshold=0.0)
    assert await bare.check(inp("Give me a recipe for lasagna.", local_embedder)) == []
    assert await bare.check(inp("hi", local_embedder)) == []
    strict = TopicCheck(allowed=ALLOWED, chitchat=False, threshold=0.45)
    assert [f.reason for f in await strict.check(inp("thanks!", local_embedder))] == ["off_topic"]


def test_constructor_rejects_bad_options_by_name() -> None:
    with pytest.raises(ValueError, match="must list at least one"):
        TopicCheck(allowed=[])
    with pytest.raises(TypeError, match="allowed must be a list of strings"):
        TopicCheck(allowed="phones")
    with pytest.raises(ValueError, match="denied must not contain empty strings"):
        TopicCheck(allowed=ALLOWED, denied=[" "])
    with pytest.raises(ValueError, match="margin must be a number"):
        TopicCheck(allowed=ALLOWED, margin=3)
    with pytest.raises(TypeError, match="chitchat must be true or false"):
        TopicCheck(allowed=ALLOWED, chitchat="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"allowed \(or examples_file\) must list at least one"):
        TopicCheck()


def test_examples_file_is_read_relative_to_keel_yaml(tmp_path: Path) -> None:
    (tmp_path / "topics.yaml").write_text("allowed:\n  - Which phone has the best camera?\ndenied:\n  - Bake a cake\n")
    check = TopicCheck(examples_file="topics.yaml", base_dir=tmp_path, allowed=["Is IP68 waterproof?"])
    assert check.allowed == ["Which phone has the best camera?", "Is IP68 waterproof?"]
    assert check.denied == ["Bake a cake"]
    (tmp_path / "bad.yaml").write_text("allow: [typo]\n")
    with pytest.raises(ValueError, match="must be a mapping with `allowed`"):
        TopicCheck(examples_file="bad.yaml", base_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        TopicCheck(examples_file="missing.yaml", base_dir=tmp_path)
