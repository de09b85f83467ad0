"""Retrieval for the chat route: the conversation as the query, context and citations, and degrading without
failing the turn when the index is down or hangs."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keel.config import AppConfig, RetrievalConfig
from keel.context import RequestContext
from keel.embed import LocalEmbedder
from keel.ingest import Ingestor
from keel.retrieval import HEADER, NO_MATCH, PREAMBLE, Retriever, format_context, query_texts, rerank
from keel.vector import Hit, LocalIndex, PgVectorIndex

KB = Path(__file__).resolve().parents[1] / "examples" / "phone-assistant" / "kb"
DOCS = ["google-pixel-7a.md", "google-pixel-8.md", "samsung-galaxy-s23-ultra.md", "oneplus-11.md", "apple-iphone-15.md"]


def app(collection: str = "kb", max_context_tokens: int = 1500, min_score: float = 0.3) -> AppConfig:
    retrieval = RetrievalConfig(
        collection=collection, top_k=3, min_score=min_score, max_context_tokens=max_context_tokens
    )
    return AppConfig(name="phones", model="m", retrieval=retrieval)


def ctx() -> RequestContext:
    return RequestContext(request_id="r1", route="sessions.message")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
async def index(tmp_path_factory: pytest.TempPathFactory, local_embedder: LocalEmbedder) -> AsyncIterator[LocalIndex]:
    root = tmp_path_factory.mktemp("retrieval")
    (root / "kb").mkdir()
    for name in DOCS:
        shutil.copy(KB / "phones" / name, root / "kb" / name)
    shutil.copy(KB / "guides" / "charging-standards.md", root / "kb" / "charging-standards.md")
    built = LocalIndex(root / "vectors")
    await Ingestor(local_embedder, built).ingest([root / "kb"], "kb")
    yield built


def test_the_query_is_the_recent_user_turns_newest_first() -> None:
    conversation: list[dict[str, Any]] = [
        user("first"),
        {"role": "assistant", "content": "answer"},
        user("second"),
        {"role": "user", "content": [{"type": "text", "text": "third"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": ""},
        user("fourth"),
    ]
    assert query_texts(conversation) == ["fourth", "third", "second"]
    assert query_texts([{"role": "system", "content": "x"}]) == []


def test_context_is_numbered_and_trimmed_to_the_budget() -> None:
    hits = [
        Hit(f"d{i}#0", 0.9 - i / 10, {"document": f"d{i}.md", "chunk": 0, "title": f"Doc {i}", "text": "x" * 600})
        for i in range(5)
    ]
    context, citations = format_context(hits, max_tokens=500)  # ~2000 characters: three 600-character chunks
    assert context.startswith(PREAMBLE + "\n\n[1] Doc 0 (d0.md)\n")
    assert [c["ref"] for c in citations] == [1, 2, 3] and "[3] Doc 2 (d2.md)" in context and "[4]" not in context
    assert citations[0] == {"ref": 1, "document": "d0.md", "chunk": 0, "score": 0.9, "title": "Doc 0"}
    assert format_context([], 500) == (NO_MATCH, [])


def test_rare_exact_terms_settle_close_calls() -> None:
    hits = [
        Hit("a", 0.61, {"title": "Galaxy S23", "text": "Snapdragon 8 Gen 2, 3,900 mAh battery"}),
        Hit("b", 0.58, {"title": "Galaxy S9", "text": "12 MP camera with a variable aperture"}),
        Hit("c", 0.40, {"title": "Galaxy S7", "text": "IP68, 3,000 mAh battery"}),
    ]
    assert [h.id for h in rerank(hits, "Which Galaxy has a variable aperture?", 0.1)] == ["b", "a", "c"]
    assert [h.id for h in rerank(hits, "Which Galaxy has a variable aperture?", 0.0)] == ["a", "b", "c"]
    assert [h.id for h in rerank(hits, "which is the best?", 0.1)] == ["a", "b", "c"]  # no telling terms
    assert rerank(hits, "variable aperture", 0.1)[0].score == 0.58  # scores stay cosines


async def test_returns_context_and_citations(index: LocalIndex, local_embedder: LocalEmbedder) -> None:
    request = ctx()
    context, citations = await Retriever(local_embedder, index).retrieve(
        app(), request, [user("Which connector does the iPhone 15 use for charging?")]
    )
    assert citations[0]["document"] == "kb/apple-iphone-15.md" and citations[0]["chunk"] == 0
    assert 0.3 <= citations[0]["score"] <= 1 and citations[0]["title"] == "Apple iPhone 15"
    assert context is not None and "[1] Apple iPhone 15 (kb/apple-iphone-15.md)" in context and "USB-C" in context
    assert request.response_headers[HEADER] == "ok" and request.timings["retrieval_ms"] > 0


async def test_a_follow_up_is_understood_from_the_conversation(
    index: LocalIndex, local_embedder: LocalEmbedder
) -> None:
    conversation = [
        user("Tell me about the Samsung Galaxy S23 Ultra."),
        {"role": "assistant", "content": "It is Samsung's 2023 flagship with a 200 MP camera."},
        user("How big is its battery?"),
    ]
    _, citations = await Retriever(local_embedder, index).retrieve(app(), ctx(), conversation)
    assert citations[0]["document"] == "kb/samsung-galaxy-s23-ultra.md"


async def test_nothing_relevant_says_so(index: LocalIndex, local_embedder: LocalEmbedder) -> None:
    request = ctx()
    context, citations = await Retriever(local_embedder, index).retrieve(
        app(min_score=0.5), request, [user("How do I bake sourdough bread?")]
    )
    assert (context, citations) == (NO_MATCH, []) and request.response_headers[HEADER] == "no-match"


async def test_an_index_that_is_down_gives_no_context_and_says_so(local_embedder: LocalEmbedder) -> None:
    down = PgVectorIndex("postgresql://postgres@127.0.0.1:9/keel", timeout_s=2)  # nothing listens on port 9
    request = ctx()
    result = await Retriever(local_embedder, down).retrieve(app(), request, [user("Pixel 8 battery?")])
    assert result == (None, []) and request.response_headers[HEADER] == "unavailable"


async def test_an_index_that_hangs_is_cut_off(local_embedder: LocalEmbedder) -> None:
    done = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = PgVectorIndex(f"postgresql://postgres@127.0.0.1:{port}/keel", timeout_s=30)
    request = ctx()
    started = asyncio.get_running_loop().time()
    result = await Retriever(local_embedder, hung, timeout_s=0.5).retrieve(app(), request, [user("Pixel 8?")])
    assert result == (None, []) and request.response_headers[HEADER] == "unavailable"
    assert asyncio.get_running_loop().time() - started < 5
    done.set()
    server.close()
    await server.wait_closed()


async def test_no_retrieval_settings_or_no_user_turn_means_no_context(
    index: LocalIndex, local_embedder: LocalEmbedder
) -> None:
    retriever = Retriever(local_embedder, index)
    plain = AppConfig(name="plain", model="m")
    assert await retriever.retrieve(plain, ctx(), [user("hi")]) == (None, [])
    assert await retriever.retrieve(app(), ctx(), [{"role": "system", "content": "x"}]) == (None, [])
