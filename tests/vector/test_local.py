"""The embedded index's durability (reopen, torn writes, compaction, other processes) and its IVF partition."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from keel.vector import LocalIndex
from keel.vector.local import LocalCollection


def unit(rows: int, dim: int = 16, seed: int = 0) -> npt.NDArray[np.float32]:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    out: npt.NDArray[np.float32] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def payloads(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"document": f"d{(start + i) % 5}", "chunk": start + i} for i in range(n)]


def ids(n: int, start: int = 0) -> list[str]:
    return [f"p{start + i}" for i in range(n)]


async def test_writes_survive_reopening(tmp_path: Path) -> None:
    vectors = unit(30)
    first = LocalIndex(tmp_path)
    await first.upsert("kb", ids(30), vectors, payloads(30))
    await first.delete_document("kb", "d2")
    reopened = LocalIndex(tmp_path)
    assert await reopened.count("kb") == 24
    hits = await reopened.search("kb", vectors[3], top_k=1)
    assert hits[0].id == "p3" and hits[0].payload == {"document": "d3", "chunk": 3}
    assert "d2" not in await reopened.documents("kb")


async def test_a_torn_record_from_a_crash_is_ignored_then_cut(tmp_path: Path) -> None:
    vectors = unit(20)
    index = LocalIndex(tmp_path)
    await index.upsert("kb", ids(10), vectors[:10], payloads(10))
    log = next((tmp_path / "kb").glob("log-*.bin"))
    good = log.stat().st_size
    with log.open("ab") as f:  # a writer died halfway through its next record
        f.write(b"KVR1\xff\x00\x00\x00\x00\x00\x00\x00partial")
    reader = LocalIndex(tmp_path)
    assert await reader.count("kb") == 10
    await reader.upsert("kb", ids(10, 10), vectors[10:], payloads(10, 10))
    assert log.stat().st_size > good
    assert await LocalIndex(tmp_path).count("kb") == 20


async def test_compaction_keeps_the_live_points(tmp_path: Path) -> None:
    vectors = unit(50)
    index = LocalIndex(tmp_path)
    await index.upsert("kb", ids(50), vectors, payloads(50))
    await index.delete_document("kb", "d0")
    index.collection("kb").compact()
    files = sorted(p.name for p in (tmp_path / "kb").iterdir())
    assert files == ["CURRENT", "LOCK", "log-1.bin", "snapshot-1.jsonl", "snapshot-1.npy"]
    reopened = LocalIndex(tmp_path)
    assert await reopened.count("kb") == 40
    assert (await reopened.search("kb", vectors[7], top_k=1))[0].id == "p7"


OTHER_PROCESS = """
import asyncio, sys
import numpy as np
from keel.vector import LocalIndex
vector = np.ones((1, 16), dtype=np.float32) / 4.0
asyncio.run(LocalIndex(sys.argv[1]).upsert("kb", ["other"], vector, [{"document": "other"}]))
"""


async def test_writes_from_another_process_are_seen(tmp_path: Path) -> None:
    index = LocalIndex(tmp_path)
    await index.upsert("kb", ids(5), unit(5), payloads(5))
    assert await index.count("kb") == 5
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", OTHER_PROCESS, str(tmp_path))
    assert await asyncio.wait_for(process.wait(), 60) == 0
    assert await index.count("kb") == 6
    assert (await index.search("kb", np.ones(16, dtype=np.float32) / 4.0, top_k=1))[0].id == "other"


def clustered(rows: int, dim: int = 32, centres: int = 40, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, rows)] + 0.35 * rng.standard_normal((rows, dim)).astype(np.float32)
    out: npt.NDArray[np.float32] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def test_the_ivf_partition_agrees_with_the_exact_scan(tmp_path: Path) -> None:
    vectors = clustered(4000)
    collection = LocalCollection(tmp_path / "big", ivf_min_rows=1000)
    collection.upsert(ids(4000), vectors, payloads(4000))
    collection.delete_document("d1")
    queries = clustered(50, seed=1)
    exact = [[h.id for h in collection.search(q, 10)] for q in queries]  # partition not built yet: exact
    assert collection.wait_for_partition(timeout_s=60)
    approx = [[h.id for h in collection.search(q, 10)] for q in queries]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert recall > 0.9
    assert all(int(i[1:]) % 5 != 1 for hits in approx for i in hits)  # deleted rows stay deleted
    collection.upsert(["late"], vectors[:1], [{"document": "late"}])  # written after the partition
    assert collection.search(vectors[0], 2)[0].id in {"late", "p0"}
    assert {h.id for h in collection.search(vectors[0], 2)} == {"late", "p0"}
