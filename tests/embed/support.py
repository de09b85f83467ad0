"""Fixtures shared by every test that needs the real embedding model (a plugin of the root conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from keel.embed import LocalEmbedder, Vectors


@pytest.fixture(scope="session")
async def local_embedder() -> AsyncIterator[LocalEmbedder]:
    """The real local model, loaded once per session."""
    embedder = LocalEmbedder()
    embedder.load()
    yield embedder
    await embedder.aclose()


class CountingEmbedder:
    """The real embedder, counting the texts it is asked for (to prove that unchanged files cost no model call)."""

    def __init__(self, inner: LocalEmbedder, name: str | None = None) -> None:
        self.inner = inner
        self.calls = 0
        self.texts = 0
        self._name = name

    @property
    def name(self) -> str:
        return self._name or self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        self.texts += len(texts)
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        pass
