"""Shared fixtures: the scripted fake upstream (the only fake) and real Keel servers on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from helpers import KeelServer
from keel.config import parse_config
from keel.testing.fake_upstream import FakeUpstreamThread


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
def keel(fake: FakeUpstreamThread) -> Iterator[Callable[..., KeelServer]]:
    """``keel(models_yaml, **top_level)`` starts a Keel whose config is ``models_yaml`` with ``{fake}`` replaced
    by the fake upstream's OpenAI base URL. Servers stop at the end of the test."""
    servers: list[KeelServer] = []

    def start(models: str, extra: str = "") -> KeelServer:
        text = (
            "logging: {level: warning, requests: true}\n" + extra + "\nmodels:\n" + config_text(fake.base_url, models)
        )
        server = KeelServer(parse_config(text, env={})).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
