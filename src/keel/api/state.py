"""What the app holds for its lifetime: config, backends, repositories and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.config import KeelConfig
from keel.embed import Embedder
from keel.guard.registry import AppGuards
from keel.history import ContextSource, History
from keel.llm.client import UpstreamClient
from keel.llm.router import Router
from keel.pipeline import Pipeline
from keel.pipeline.accounting import Accounting
from keel.pipeline.admission import EmergencyMode
from keel.pipeline.auth import Authenticator
from keel.prompts import ManagedSystemPrompt, PromptService
from keel.state import Counters
from keel.store import Database, KeyRepository, ScopeLimitsRepository, SpendRepository
from keel.store.sessions import SessionRepository
from keel.store.writer import BatchWriter
from keel.vector import VectorIndex

__all__ = ["AppState"]


@dataclass(slots=True)
class AppState:
    config: KeelConfig
    upstream: UpstreamClient  # the worker's pool of upstream connections
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
    prompts: PromptService
    sessions: SessionRepository
    history: History
    system_prompts: ManagedSystemPrompt  # an app's system messages and prompt options, for session turns
    context_source: ContextSource  # retrieval for session turns
    embedder: Embedder  # the one shared embedder (retrieval, ingest, guardrails)
    vectors: VectorIndex
    guards: dict[str, AppGuards] = field(default_factory=dict)  # apps with guardrails, built once at start
    chunk_counts: tuple[float, dict[str, int]] | None = None  # /ready's last count of each collection, and when
