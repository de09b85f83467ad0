"""The local embedder against an independent float32 reference, and its batching, caching and integrity checks."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from embed.reference import ReferenceMiniLM
from keel.embed import EmbeddingError, LocalEmbedder
from keel.embed.local import MODEL_FILES, ModelFile

SENTENCES = [
    "How long does the Pixel 8 battery last?",
    "USB Power Delivery negotiates the voltage between charger and phone.",
    "Qi2 adds magnetic alignment to wireless charging.",
    "Is it bad to leave my phone charging overnight at 100 percent?",
]


async def test_matches_an_independent_float32_reference(local_embedder: LocalEmbedder) -> None:
    reference = ReferenceMiniLM()
    expected = np.stack([reference.embed_one(s) for s in SENTENCES])
    got = await local_embedder.embed(SENTENCES)
    cosines = (expected * got).sum(axis=1)
    assert cosines.min() >= 0.99, cosines


async def test_vectors_are_unit_float32_rows(local_embedder: LocalEmbedder) -> None:
    vectors = await local_embedder.embed(["a", "bb", "a"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert (await local_embedder.embed([])).shape == (0, 384)


async def test_a_padded_batch_gives_the_same_vectors_as_one_by_one(local_embedder: LocalEmbedder) -> None:
    texts = ["hi", *SENTENCES, " ".join(SENTENCES * 3)]  # very different lengths: heavy padding in one batch
    batch = local_embedder.encode(texts)
    single = np.stack([local_embedder.encode([t])[0] for t in texts])
    assert (batch * single).sum(axis=1).min() > 0.9999


async def test_paraphrases_are_closer_than_unrelated_texts(local_embedder: LocalEmbedder) -> None:
    a, b, c = await local_embedder.embed(
        [
            "What is the battery capacity of the Galaxy S23?",
            "How many mAh is the Samsung Galaxy S23 battery?",
            "The recipe needs two cups of flour and an egg.",
        ]
    )
    assert float(a @ b) > 0.7 > 0.2 > float(a @ c)


async def test_concurrent_callers_share_one_batch() -> None:
    embedder = LocalEmbedder(batch_size=64, window_s=0.02)
    try:
        results = await asyncio.gather(*(embedder.embed([f"question number {i}"]) for i in range(10)))
        assert embedder.batches == 1
        alone = embedder.encode(["question number 7"])[0]
        assert float(results[7][0] @ alone) > 0.9999
    finally:
        await embedder.aclose()


async def test_cached_texts_skip_the_model() -> None:
    embedder = LocalEmbedder(cache_size=8)
    try:
        first = await embedder.embed(["the same user message"])
        again = await embedder.embed(["the same user message", "the same user message"])
        assert embedder.batches == 1
        np.testing.assert_array_equal(first[0], again[1])
        await embedder.embed([f"text {i}" for i in range(10)])  # evicts it: the cache holds 8
        await embedder.embed(["the same user message"])
        assert embedder.batches == 3
    finally:
        await embedder.aclose()


async def test_the_event_loop_keeps_running_during_a_large_batch(local_embedder: LocalEmbedder) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        for _ in range(40):
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    await asyncio.gather(local_embedder.embed([f"chunk {i} " * 30 for i in range(96)]), ticker())
    assert max(gaps) < 0.25, max(gaps)


def test_a_file_that_does_not_match_its_checksum_is_refused() -> None:
    real = MODEL_FILES["tokenizer"]
    altered = ModelFile(real.distribution, real.path, "0" * 64, real.size)
    with pytest.raises(EmbeddingError, match="does not match its recorded sha256"):
        altered.locate()
    assert real.locate().is_file()


def test_a_missing_package_names_the_install_command() -> None:
    missing = ModelFile("keel-no-such-model-package", "x/model.onnx", "0" * 64, 1)
    with pytest.raises(EmbeddingError, match="uv pip install keel-no-such-model-package"):
        missing.locate()
