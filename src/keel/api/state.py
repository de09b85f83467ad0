"""What the app holds for its lifetime: config, backends, repositories and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from keel.config import KeelConfig
from keel.llm.router import Router
from keel.pipeline import Pipeline
from keel.pipeline.accounting import Accounting
from keel.pipeline.admission import EmergencyMode
from keel.pipeline.auth import Authenticator
from keel.state import Counters
from keel.store import Database, KeyRepository, ScopeLimitsRepository, SpendRepository
from keel.store.writer import BatchWriter

__all__ = ["AppState"]


@dataclass(slots=True)
class AppState:
    config: KeelConfig
    session: aiohttp.ClientSession
    router: Router
    pipeline: Pipeline
    started: int
    db: Database
    counters: Counters
    keys: KeyRepository
    limits: ScopeLimitsRepository
    spend: SpendRepository
    ledger: BatchWriter[dict[str, Any]]
    auth: Authenticator
    emergency: EmergencyMode
    accounting: Accounting
