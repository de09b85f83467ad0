"""Shared fixtures: the scripted fake upstream (the only fake) and real Keel servers on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import KeelServer
from keel.config import parse_config
from keel.testing.fake_upstream import FakeUpstreamThread

pytest_plugins = ["embed.support", "fixtures.postgres_server", "fixtures.redis_server"]


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstreamThread]:
    fake = FakeUpstreamThread()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_upstream: FakeUpstreamThread) -> FakeUpstreamThread:
    fake_upstream.reset()
    return fake_upstream


def config_text(fake_url: str, models: str) -> str:
    return models.replace("{fake}", fake_url + "/v1").replace("{fake_root}", fake_url)


@pytest.fixture
def keel(fake: FakeUpstreamThread, tmp_path: Path) -> Iterator[Callable[..., KeelServer]]:
    """``keel(models_yaml, extra=top_level_yaml)`` starts a Keel whose config is ``models_yaml`` with ``{fake}``
    replaced by the fake upstream's OpenAI base URL, on a fresh SQLite file unless ``extra`` names a
    ``database_url``. Servers stop at the end of the test."""
    servers: list[KeelServer] = []

    def start(models: str, extra: str = "") -> KeelServer:
        if "database_url" not in extra:
            extra += f"\ndatabase_url: sqlite+aiosqlite:///{tmp_path}/keel-{len(servers)}.db"
        text = "logging: {level: warning}\n" + extra + "\nmodels:\n" + config_text(fake.base_url, models)
        server = KeelServer(parse_config(text, env={})).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
