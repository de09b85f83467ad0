"""The OpenAI-compatible embedder against the fake upstream's ``/v1/embeddings``."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import SecretStr

from keel.config import EmbeddingsConfig
from keel.embed import EmbeddingError, OpenAIEmbedder, build_embedder
from keel.testing.fake_upstream import FakeUpstreamThread


async def test_embeds_in_batches_and_normalises(fake: FakeUpstreamThread) -> None:
    embedder = OpenAIEmbedder(model="text-embedding-3-small", api_base=f"{fake.base_url}/v1", batch_size=2)
    try:
        vectors = await embedder.embed(["one", "two", "three", "one"])
        assert vectors.shape == (4, 8) and embedder.dim == 8
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(vectors[0], vectors[3])
        posts = [r for r in fake.requests if r["path"] == "/v1/embeddings"]
        assert [r["body"]["input"] for r in posts] == [["one", "two"], ["three"]]
        assert posts[0]["body"]["model"] == "text-embedding-3-small"
    finally:
        await embedder.aclose()


async def test_upstream_errors_become_embedding_errors() -> None:
    upstream = FakeUpstreamThread(api_key="sk-right")
    upstream.start()
    try:
        config = EmbeddingsConfig(
            provider="openai", model="m", api_base=f"{upstream.base_url}/v1", api_key=SecretStr("sk-wrong")
        )
        embedder = build_embedder(config)
        with pytest.raises(EmbeddingError, match="401"):
            await embedder.embed(["hello"])
        await embedder.aclose()
    finally:
        upstream.stop()


async def test_an_unreachable_upstream_is_an_embedding_error() -> None:
    embedder = OpenAIEmbedder(model="m", api_base="http://127.0.0.1:9/v1", timeout_s=2)
    with pytest.raises(EmbeddingError):
        await embedder.embed(["hello"])
    with pytest.raises(EmbeddingError, match="first embed"):
        _ = embedder.dim
    await embedder.aclose()
