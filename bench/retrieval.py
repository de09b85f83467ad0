"""Retrieval quality on the sample knowledge base: recall@5 of the document that holds the answer.

    .venv/bin/python bench/retrieval.py [-v]

Ingests ``examples/phone-assistant/kb`` with the local embedder into a cached index (the first run embeds every
chunk; later runs find every file unchanged), then asks the questions of ``bench/data/retrieval_questions.jsonl``
through :class:`keel.retrieval.Retriever`, the chat route's own code path, with ``top_k`` 5. Each question is
labelled with the document that answers it (``kb/...md``) or, for table rows, the record (``...jsonl#row``).
Conversations measure follow-up questions ("does it charge wirelessly?") with the weighted multi-turn query
against the last message alone. Questions the knowledge base cannot answer show how well ``min_score`` separates
"no match" from a match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from keel.config import AppConfig, RetrievalConfig
from keel.context import RequestContext
from keel.embed import LocalEmbedder
from keel.ingest import Ingestor
from keel.retrieval import LEXICAL_WEIGHT, Retriever
from keel.vector import LocalIndex

ROOT = Path(__file__).resolve().parents[1]
KB = ROOT / "examples" / "phone-assistant" / "kb"
QUESTIONS = ROOT / "bench" / "data" / "retrieval_questions.jsonl"
COLLECTION = "bench_phones"
TOP_K = 5
MIN_SCORE = 0.3  # the sample app's retrieval.min_score


def app_config() -> AppConfig:
    retrieval = RetrievalConfig(collection=COLLECTION, top_k=TOP_K, min_score=-1.0, max_context_tokens=100_000)
    return AppConfig(name="bench", model="bench", retrieval=retrieval)


def found(citations: list[dict[str, Any]], answer: str) -> int | None:
    """1-based rank of the answer among the citations, or None."""
    for rank, c in enumerate(citations, start=1):
        if (f"{c['document']}#{c['chunk']}" if "#" in answer else c["document"]) == answer:
            return rank
    return None


async def main(verbose: bool, lexical_weight: float) -> None:
    cache = Path(os.environ.get("KEEL_HOME") or ".keel") / "bench-cache" / "retrieval-index"
    embedder, index = LocalEmbedder(), LocalIndex(cache)
    report = await Ingestor(embedder, index).ingest([KB], COLLECTION, prune=True)
    print(f"knowledge base: {report.summary()}; {await index.count(COLLECTION)} chunks indexed")
    retriever = Retriever(embedder, index, lexical_weight=lexical_weight)
    app = app_config()
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]

    async def ask(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ctx = RequestContext(request_id="bench", route="bench")
        return (await retriever.retrieve(app, ctx, conversation))[1]

    single: list[int | None] = []
    halves: dict[str, list[int | None]] = {"dev": [], "test": []}
    multi: list[tuple[int | None, int | None]] = []
    best_in: list[float] = []
    best_out: list[float] = []
    latencies: list[float] = []
    for row in rows:
        conversation = row.get("conversation") or [{"role": "user", "content": row["question"]}]
        start = time.perf_counter()
        citations = await ask(conversation)
        latencies.append((time.perf_counter() - start) * 1000)
        top = citations[0]["score"] if citations else -1.0
        if row["answer"] is None:
            best_out.append(top)
            if verbose:
                print(f"  out-of-KB {row['id']}: best {top:.3f} {citations[0]['document'] if citations else ''}")
            continue
        best_in.append(top)
        rank = found(citations, row["answer"])
        if "conversation" in row:
            last_only = await ask(conversation[-1:])
            multi.append((rank, found(last_only, row["answer"])))
        else:
            single.append(rank)
            halves["dev" if int(row["id"][1:]) % 2 else "test"].append(rank)
        if verbose and rank != 1:
            asked = conversation[-1]["content"]
            print(f"  {row['id']} rank {rank}: {asked!r} -> want {row['answer']}, got {citations[0]['document']}")

    def recall(ranks: list[int | None], k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)

    mrr = np.mean([1 / r if r else 0.0 for r in single])
    print(
        f"\nsingle questions (n={len(single)}): recall@5 {recall(single, 5):.3f}  recall@1 {recall(single, 1):.3f}  "
        f"MRR {mrr:.3f}"
    )
    print(
        f"  halves: dev (odd ids, n={len(halves['dev'])}) recall@5 {recall(halves['dev'], 5):.3f}, "
        f"test (even ids, n={len(halves['test'])}) recall@5 {recall(halves['test'], 5):.3f}"
    )
    weighted, last = [m[0] for m in multi], [m[1] for m in multi]
    print(
        f"follow-up questions (n={len(multi)}): recall@5 {recall(weighted, 5):.3f} with the weighted conversation "
        f"query, {recall(last, 5):.3f} with the last message alone"
    )
    everything = single + weighted
    print(f"all answerable (n={len(everything)}): recall@5 {recall(everything, 5):.3f}")
    below = sum(1 for s in best_in if s < MIN_SCORE)
    above = sum(1 for s in best_out if s >= MIN_SCORE)
    print(
        f"min_score {MIN_SCORE}: {below}/{len(best_in)} answerable questions fall below it (no context); "
        f"{above}/{len(best_out)} out-of-KB questions pass it (best scores: answerable median "
        f"{np.median(best_in):.2f}, out-of-KB max {max(best_out):.2f})"
    )
    print(
        f"retrieval latency (embed + search, embedder cache cold): p50 {np.percentile(latencies, 50):.1f} ms, "
        f"p99 {np.percentile(latencies, 99):.1f} ms"
    )
    await embedder.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show misses and out-of-KB scores")
    parser.add_argument(
        "--lexical-weight", type=float, default=LEXICAL_WEIGHT, help="rerank weight (0: vector order only)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.verbose, args.lexical_weight))
