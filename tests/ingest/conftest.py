from embed.support import local_embedder  # noqa: F401 - fixture
