"""Embedders: the local MiniLM model (default, offline) or any OpenAI-compatible ``/v1/embeddings`` upstream, behind
one :class:`Embedder` protocol. Build the one shared instance from config with :func:`build_embedder`."""

from __future__ import annotations

from keel.config import DEFAULT_API_BASES, EmbeddingsConfig
from keel.embed.base import BatchingEmbedder, Embedder, EmbeddingError, Vectors, normalize
from keel.embed.local import LocalEmbedder
from keel.embed.openai import OpenAIEmbedder
from keel.llm.client import UpstreamClient

__all__ = [
    "BatchingEmbedder",
    "Embedder",
    "EmbeddingError",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "Vectors",
    "build_embedder",
    "normalize",
]


def build_embedder(config: EmbeddingsConfig, client: UpstreamClient | None = None) -> Embedder:
    """The embedder ``config`` describes. ``client``: the app's shared upstream connection pool, for ``openai``."""
    if config.provider == "openai":
        assert config.model is not None  # the config validator requires it
        return OpenAIEmbedder(
            model=config.model,
            api_base=config.api_base or DEFAULT_API_BASES["openai"],
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            client=client,
            batch_size=config.batch_size,
            cache_size=config.cache_size,
        )
    return LocalEmbedder(batch_size=config.batch_size, cache_size=config.cache_size)
