"""What the app holds for its lifetime: config, the shared HTTP session, the router and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from keel.config import KeelConfig
from keel.llm.router import Router
from keel.pipeline import Pipeline

__all__ = ["AppState"]


@dataclass(slots=True)
class AppState:
    config: KeelConfig
    session: aiohttp.ClientSession
    router: Router
    pipeline: Pipeline
    started: int
