"""Provider registry. Built-in wire interfaces register through the same ``keel.providers`` entry points a
third-party plugin uses, so adding a provider never edits the router or the pipeline."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from keel.config import ConfigError, Deployment
from keel.llm.base import Provider
from keel.llm.client import UpstreamClient

__all__ = ["build_provider", "provider_class"]


@cache
def provider_class(name: str) -> Any:
    for ep in entry_points(group="keel.providers"):
        if ep.name == name:
            return ep.load()
    known = ", ".join(sorted(ep.name for ep in entry_points(group="keel.providers")))
    raise ConfigError(f"unknown provider {name!r} (installed: {known}); install its plugin or fix `provider:`")


def build_provider(deployment: Deployment, client: UpstreamClient) -> Provider:
    """A provider class is called with the deployment and the worker's shared upstream connection pool."""
    provider: Provider = provider_class(deployment.provider)(deployment, client)
    return provider
