"""Latency of a vector search at 100k chunks: p50/p99 of ``LocalIndex`` (exact scan, then the IVF partition it
builds above 20k rows), with the partition's recall@10 against the exact answer; optionally pgvector too.

    .venv/bin/python bench/vector_search.py                       # 100k real MiniLM vectors (see --data)
    .venv/bin/python bench/vector_search.py --data random         # worst case for any partition: no structure
    .venv/bin/python bench/vector_search.py --pgvector            # also pgvector (HNSW) on a throwaway server

``--data real`` embeds distinct questions from ``shared/benchmarks/gptcache-qqp`` with the local embedder (once:
about 10-15 minutes on 2 busy cores; cached under ``$KEEL_HOME/bench-cache``), indexes ``--rows`` of them and
queries with held-out ones. ``--data random`` uses uniform random unit vectors, where every approximate index
does badly; it is reported so that nobody mistakes it for the typical case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keel.vector.local import LocalIndex

Vectors = npt.NDArray[np.float32]
DIM = 384
QQP = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "gptcache-qqp"


def percentiles(samples_ms: list[float]) -> str:
    a = np.array(samples_ms)
    return f"p50 {np.percentile(a, 50):6.2f} ms   p99 {np.percentile(a, 99):6.2f} ms"


def random_vectors(n: int, seed: int) -> Vectors:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    out: Vectors = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def real_vectors(rows: int, queries: int) -> tuple[Vectors, Vectors]:
    cache = Path(os.environ.get("KEEL_HOME") or ".keel") / "bench-cache" / f"qqp-minilm-{rows + queries}.npy"
    if not cache.exists():
        texts = distinct_questions(rows + queries)
        print(f"embedding {len(texts)} questions once (cached in {cache}) ...", flush=True)
        from keel.embed import LocalEmbedder

        async def embed() -> Vectors:
            embedder = LocalEmbedder(batch_size=64, cache_size=0)
            parts = []
            for start in range(0, len(texts), 4096):
                parts.append(await embedder.embed(texts[start : start + 4096]))
                print(f"  {start + len(parts[-1])}/{len(texts)}", flush=True)
            await embedder.aclose()
            return np.concatenate(parts)

        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, asyncio.run(embed()))
    data: Vectors = np.load(cache)
    return data[:rows], data[rows:]


def distinct_questions(n: int) -> list[str]:
    files = sorted(QQP.glob("pairs_*.jsonl"))
    if not files:
        sys.exit(f"--data real needs {QQP} (the shared benchmarks folder); use --data random")
    seen: dict[str, None] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for text in (row["text_a"].strip(), row["text_b"].strip()):
                if len(text) > 8:
                    seen.setdefault(text)
    if len(seen) < n:
        sys.exit(f"only {len(seen)} distinct questions available; lower --rows")
    return list(seen)[:n]


def timed(fn: Callable[[Vectors], Any], queries: Vectors) -> list[float]:
    samples = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def bench_local(vectors: Vectors, queries: Vectors, nprobe: int | None) -> None:
    rows = len(vectors)
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as root:
        index = LocalIndex(root)
        collection = index.collection("bench")
        start = time.perf_counter()
        for s in range(0, rows, 10_000):
            ids = [f"doc{i // 10}#{i % 10}" for i in range(s, min(rows, s + 10_000))]
            payloads = [
                {"document": f"doc{i // 10}", "chunk": i % 10, "shard": i % 100} for i in range(s, s + len(ids))
            ]
            collection.upsert(ids, vectors[s : s + len(ids)], payloads)
        print(f"LocalIndex: {rows} x {DIM} float32 written in {time.perf_counter() - start:.1f} s")

        collection.ivf_min_rows = rows + 1  # force the exact scan
        exact = [[h.id for h in collection.search(q, 10)] for q in queries]
        print(f"  exact scan            {percentiles(timed(lambda q: collection.search(q, 10), queries))}")
        collection.ivf_min_rows = 20_000
        start = time.perf_counter()
        collection.wait_for_partition()
        assert collection._ivf is not None
        if nprobe:
            collection._ivf.nprobe = nprobe
        ivf = collection._ivf
        print(
            f"  IVF partition built in {time.perf_counter() - start:.1f} s in the background "
            f"({len(ivf.offsets) - 1} lists, nprobe {ivf.nprobe})"
        )
        found = [[h.id for h in collection.search(q, 10)] for q in queries]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found, strict=True)])
        print(f"  IVF search (sync)     {percentiles(timed(lambda q: collection.search(q, 10), queries))}")
        print(f"  recall@10 vs exact    {recall:.3f}")

        async def via_async() -> list[float]:
            samples = []
            for q in queries:
                start = time.perf_counter()
                await index.search("bench", q, 10)
                samples.append((time.perf_counter() - start) * 1000)
            return samples

        print(f"  IVF search (async)    {percentiles(asyncio.run(via_async()))}  (LocalIndex.search: + thread hop)")
        one_percent = timed(lambda q: collection.search(q, 10, filter={"shard": 7}), queries)
        print(f"  filtered, 1% of rows  {percentiles(one_percent)}  (exact over the matching rows)")


def bench_pgvector(vectors: Vectors, queries: Vectors) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from keel.vector.pgvector import PgVectorIndex
    from vector.pgserver import start_pgvector_server  # type: ignore[import-not-found]

    server = start_pgvector_server()
    try:

        async def run() -> None:
            index = PgVectorIndex(server.url, timeout_s=300)
            start = time.perf_counter()
            for s in range(0, len(vectors), 1_000):
                ids = [f"doc{i // 10}#{i % 10}" for i in range(s, min(len(vectors), s + 1_000))]
                payloads = [{"document": f"doc{i // 10}", "chunk": i % 10} for i in range(s, s + len(ids))]
                await index.upsert("bench", ids, vectors[s : s + len(ids)], payloads)
            print(f"pgvector: {len(vectors)} rows written in {time.perf_counter() - start:.1f} s (HNSW maintained)")
            exact = []
            samples = []
            for q in queries:
                t = time.perf_counter()
                exact.append([h.id for h in await index.search("bench", q, 10)])
                samples.append((time.perf_counter() - t) * 1000)
            print(f"  HNSW search           {percentiles(samples)}  (round trip over loopback)")
            truth = [set(f"doc{i // 10}#{i % 10}" for i in np.argsort(-(vectors @ q))[:10]) for q in queries]
            recall = np.mean([len(t & set(e)) / 10 for t, e in zip(truth, exact, strict=True)])
            print(f"  recall@10 vs exact    {recall:.3f}")
            await index.aclose()

        asyncio.run(run())
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--data", choices=["real", "random"], default="real")
    parser.add_argument("--nprobe", type=int, default=None, help="lists scanned per query (default: the index's)")
    parser.add_argument("--pgvector", action="store_true", help="also measure pgvector on a throwaway server")
    args = parser.parse_args()
    if args.data == "real":
        vectors, queries = real_vectors(args.rows, args.queries)
    else:
        vectors, queries = random_vectors(args.rows, 1), random_vectors(args.queries, 2)
    print(f"data: {args.data}, {len(vectors)} rows, {len(queries)} queries, top 10, {os.cpu_count()} cores")
    bench_local(vectors, queries, args.nprobe)
    if args.pgvector:
        bench_pgvector(vectors, queries)


if __name__ == "__main__":
    main()
