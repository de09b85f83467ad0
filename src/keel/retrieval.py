"""Retrieval for the chat route: the knowledge-base chunks relevant to a conversation, as prompt context plus the
citations returned with the answer.

The query is the conversation's recent user turns, not only the last message: "and its battery?" means nothing
without the turn before. Each of the last three user messages is embedded (the embedder's cache makes the older
ones free: they were embedded on their own turn) and their vectors are averaged with weights 1, 0.5, 0.25, so the
newest turn leads and the earlier ones supply the subject.

Retrieval never fails a turn. If the embedder or the index is down or slow, the answer proceeds without context
and ``x-keel-retrieval: unavailable`` says so (the sessions route copies it into the response metadata); when
nothing scores ``min_score`` the header says ``no-match`` and the context is a note telling the model that the
knowledge base does not hold the answer, so it says so instead of guessing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from keel.config import AppConfig
from keel.context import RequestContext
from keel.embed import Embedder, normalize
from keel.llm.tokens import message_text
from keel.vector import Hit, VectorIndex

__all__ = ["HEADER", "NO_MATCH", "PREAMBLE", "Retriever", "format_context", "query_texts"]

log = logging.getLogger("keel.retrieval")

HEADER = "x-keel-retrieval"
PREAMBLE = (
    "Knowledge base excerpts for the user's question. Answer from them and cite them as [n]. If they do not "
    "contain the answer, say that the knowledge base does not cover it."
)
NO_MATCH = (
    "The knowledge base has nothing relevant to the user's question. If an answer would need it, say that the "
    "knowledge base does not cover this instead of guessing."
)
TURN_WEIGHTS = (1.0, 0.5, 0.25)  # newest user turn first
LEXICAL_WEIGHT = 0.1  # see rerank()
POOL_FACTOR = 4  # candidates fetched per chunk kept, for the rerank
_TOKEN = re.compile(r"[a-z0-9]+")
_STOPWORD_TEXT = (
    "a an and are can could did do does for from has have how i in is it its me my of on or should the this to "
    "was what when which who why will with would you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
CHARS_PER_TOKEN = 4


def query_texts(conversation: Sequence[dict[str, Any]], turns: int = len(TURN_WEIGHTS)) -> list[str]:
    """The last ``turns`` non-empty user messages, newest first."""
    out: list[str] = []
    for message in reversed(conversation):
        if message.get("role") == "user" and (text := message_text(message.get("content")).strip()):
            out.append(text)
            if len(out) == turns:
                break
    return out


def _terms(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS}


def rerank(hits: Sequence[Hit], question: str, weight: float) -> list[Hit]:
    """Hits reordered by cosine plus ``weight`` x the share of the question's terms found in the chunk, each
    term weighted by its rarity among the hits (an IDF over the candidate pool). Small sentence embedders blur
    exact names and codes ("IP68", "SH-02G", "Face ID"); words that few candidates contain settle those ties.
    Scores are left as cosines, so ``min_score`` and citations keep their meaning."""
    terms = _terms(question)
    if weight <= 0 or not terms or len(hits) < 2:
        return list(hits)
    found = [terms & _terms(f"{h.payload.get('title', '')} {h.payload.get('text', '')}") for h in hits]
    rarity = {t: math.log(1 + len(hits) / (1 + sum(t in f for f in found))) for t in terms}
    total = sum(rarity.values())
    bonus = [sum(rarity[t] for t in f) / total for f in found]
    order = sorted(range(len(hits)), key=lambda i: hits[i].score + weight * bonus[i], reverse=True)
    return [hits[i] for i in order]


def format_context(hits: Sequence[Hit], max_tokens: int) -> tuple[str, list[dict[str, Any]]]:
    """Hits as numbered sources (``[1] Title (document)`` then the text) within ``max_tokens`` (estimated), and
    the citations of those that fit, in the same order. Without hits, a note telling the model so."""
    budget = max_tokens * CHARS_PER_TOKEN - len(PREAMBLE) - 2
    blocks: list[str] = []
    citations: list[dict[str, Any]] = []
    for hit in hits:
        ref = len(blocks) + 1
        title = str(hit.payload.get("title") or hit.payload.get("document") or hit.id)
        head = f"[{ref}] {title} ({hit.payload.get('document', hit.id)})\n"
        text = str(hit.payload.get("text", ""))
        used = sum(len(b) + 2 for b in blocks)
        room = budget - used - len(head)
        if room < min(len(text), 200):  # a sliver of a chunk misleads more than it helps
            break
        blocks.append(head + (text if len(text) <= room else text[: room - 1].rstrip() + "…"))
        citation = {"ref": ref, "document": hit.payload.get("document", hit.id), "chunk": hit.payload.get("chunk")}
        citation |= {"score": round(hit.score, 4), "title": title}
        citations.append(citation)
    return ("\n\n".join([PREAMBLE, *blocks]) if blocks else NO_MATCH), citations


class Retriever:
    """The chat route's context source over the shared embedder and vector index. ``timeout_s`` bounds the whole
    lookup (embedding plus search) so a stuck index costs a turn at most that."""

    def __init__(
        self, embedder: Embedder, index: VectorIndex, *, timeout_s: float = 3.0, lexical_weight: float = LEXICAL_WEIGHT
    ) -> None:
        self.embedder = embedder
        self.index = index
        self.timeout_s = timeout_s
        self.lexical_weight = lexical_weight

    async def retrieve(
        self, app: AppConfig, ctx: RequestContext, conversation: list[dict[str, Any]]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        settings = app.retrieval
        texts = query_texts(conversation)
        if settings is None or not texts:
            return None, []
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                vectors = await self.embedder.embed(texts)
                weights = np.asarray(TURN_WEIGHTS[: len(texts)], dtype=np.float32)
                query = normalize((weights @ vectors)[None, :])[0]
                pool = settings.top_k * POOL_FACTOR if self.lexical_weight else settings.top_k
                hits = await self.index.search(settings.collection, query, top_k=pool, min_score=settings.min_score)
            hits = rerank(hits, texts[0], self.lexical_weight)[: settings.top_k]
        except Exception as exc:  # TimeoutError included: retrieval degrades, the turn goes on
            log.warning(
                "retrieval unavailable, answering without context: %r",
                exc,
                extra={"fields": {"request_id": ctx.request_id, "collection": settings.collection}},
            )
            ctx.response_headers[HEADER] = "unavailable"
            return None, []
        finally:
            ctx.timings["retrieval_ms"] = (time.perf_counter() - started) * 1000
        context, citations = format_context(hits, settings.max_context_tokens)
        ctx.response_headers[HEADER] = "ok" if citations else "no-match"
        return context, citations
