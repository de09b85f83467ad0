"""``OpenAIEmbedder``: any OpenAI-compatible ``POST /embeddings`` upstream (OpenAI, vLLM, Ollama, LiteLLM, a Keel).

The vector size is whatever the upstream returns; it is known after the first call. Vectors are normalised here,
since not every server returns unit vectors and Keel's indexes score by dot product.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from httptools import HttpParserError

from keel.embed.base import BatchingEmbedder, EmbeddingError, Vectors, normalize
from keel.llm.client import UpstreamClient

__all__ = ["OpenAIEmbedder"]


class OpenAIEmbedder(BatchingEmbedder):
    """Embeds through ``{api_base}/embeddings``; pass the app's shared ``client`` to reuse its connection pool."""

    def __init__(
        self,
        *,
        model: str,
        api_base: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        client: UpstreamClient | None = None,
        batch_size: int = 64,
        cache_size: int = 4096,
        timeout_s: float = 30.0,
        window_s: float = 0.002,
    ) -> None:
        super().__init__(batch_size=batch_size, cache_size=cache_size, window_s=window_s)
        self.model = model
        self.url = api_base.rstrip("/") + "/embeddings"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = client
        self._owns_client = client is None
        self._timeout_s = timeout_s
        self._dim: int | None = None

    @property
    def name(self) -> str:
        return f"openai/{self.model}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise EmbeddingError(f"the vector size of {self.name} is known after its first embed() call")
        return self._dim

    async def _embed_batch(self, texts: list[str]) -> Vectors:
        parts = [await self._post(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(parts)

    async def _post(self, texts: list[str]) -> Vectors:
        if self._client is None:
            self._client = UpstreamClient(limit=16)
        body = orjson.dumps({"model": self.model, "input": texts, "encoding_format": "float"})
        try:
            async with asyncio.timeout(self._timeout_s):
                resp = await self._client.request("POST", self.url, headers=self._headers, body=body)
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
            data: Any = orjson.loads(raw)
        except (OSError, HttpParserError, TimeoutError, ValueError) as exc:
            raise EmbeddingError(f"{self.url} failed: {exc!r}") from exc
        if resp.status != 200:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise EmbeddingError(f"{self.url} answered {resp.status}: {message or data!r}")
        try:
            rows = sorted(data["data"], key=lambda item: item["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingError(f"{self.url} returned a malformed body: {exc!r}") from exc
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise EmbeddingError(f"{self.url} returned {vectors.shape} vectors for {len(texts)} texts")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise EmbeddingError(f"{self.url} changed its vector size from {self._dim} to {vectors.shape[1]}")
        self._dim = int(vectors.shape[1])
        return normalize(vectors)

    async def aclose(self) -> None:
        await super().aclose()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
