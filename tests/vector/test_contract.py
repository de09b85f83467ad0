"""The VectorIndex contract, run on the embedded index and on pgvector (a real PostgreSQL 16 with pgvector)."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from keel.vector import VectorIndex, VectorIndexError


def unit(rows: int, dim: int = 16, seed: int = 0) -> npt.NDArray[np.float32]:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    out: npt.NDArray[np.float32] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


async def fill(index: VectorIndex, vectors: npt.NDArray[np.float32]) -> None:
    ids = [f"doc{i % 4}#{i}" for i in range(len(vectors))]
    payloads = [
        {"document": f"doc{i % 4}", "doc_hash": f"h{i % 4}", "chunk": i, "fields": {"brand": ["Sony", "Google"][i % 2]}}
        for i in range(len(vectors))
    ]
    await index.upsert("phones", ids, vectors, payloads)


async def test_search_ranks_by_cosine_with_top_k_and_threshold(index: VectorIndex) -> None:
    vectors = unit(40)
    await fill(index, vectors)
    query = vectors[7]
    hits = await index.search("phones", query, top_k=5)
    expected = np.argsort(-(vectors @ query))[:5]
    assert [h.id for h in hits] == [f"doc{i % 4}#{i}" for i in expected]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload["chunk"] == 7
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    strict = await index.search("phones", query, top_k=5, min_score=0.99)
    assert [h.id for h in strict] == ["doc3#7"]


async def test_filters_match_payload_values(index: VectorIndex) -> None:
    vectors = unit(40)
    await fill(index, vectors)
    hits = await index.search("phones", vectors[0], top_k=50, filter={"fields.brand": "Google"})
    assert len(hits) == 20 and {h.payload["fields"]["brand"] for h in hits} == {"Google"}
    both = await index.search("phones", vectors[0], top_k=50, filter={"fields.brand": "Google", "document": "doc1"})
    assert {h.payload["document"] for h in both} == {"doc1"} and len(both) == 10
    assert await index.search("phones", vectors[0], filter={"fields.brand": "Nokia"}) == []
    assert await index.search("phones", vectors[0], filter={"chunk": 3.0}) != []  # 3 and 3.0 are equal in JSON


async def test_upsert_replaces_and_delete_document_removes(index: VectorIndex) -> None:
    vectors = unit(40)
    await fill(index, vectors)
    assert await index.count("phones") == 40
    assert await index.documents("phones") == {f"doc{i}": f"h{i}" for i in range(4)}
    await index.upsert("phones", ["doc0#0"], vectors[1:2], [{"document": "doc0", "doc_hash": "new", "chunk": 0}])
    assert await index.count("phones") == 40
    hit = await index.search("phones", vectors[1], top_k=2)
    assert {h.id for h in hit} == {"doc0#0", "doc1#1"}
    assert await index.delete_document("phones", "doc0") == 10
    assert await index.count("phones") == 30
    assert all(h.payload["document"] != "doc0" for h in await index.search("phones", vectors[0], top_k=40))
    assert await index.delete_document("phones", "doc0") == 0


async def test_missing_collections_are_empty_and_drop_is_final(index: VectorIndex) -> None:
    assert await index.search("nothing", unit(1)[0]) == []
    assert await index.count("nothing") == 0 and await index.documents("nothing") == {}
    await fill(index, unit(8))
    await index.drop("phones")
    await index.drop("phones")
    assert await index.count("phones") == 0
    await fill(index, unit(8, dim=32))  # a dropped collection can come back with another dimension
    assert await index.count("phones") == 8


async def test_a_collection_keeps_its_dimension(index: VectorIndex) -> None:
    await fill(index, unit(4))
    with pytest.raises(VectorIndexError, match="16-dimensional"):
        await index.upsert("phones", ["x"], unit(1, dim=8), [{"document": "x"}])
    with pytest.raises(VectorIndexError):
        await index.search("phones", unit(1, dim=8)[0])


async def test_invalid_collection_names_are_refused(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="invalid collection name"):
        await index.upsert("../etc", ["x"], unit(1), [{"document": "x"}])
    await index.ping()
