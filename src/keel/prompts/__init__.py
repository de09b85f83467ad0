"""Managed prompts: versioned, labelled, experimented on and rolled back as data, without a deploy.

::

    service = PromptService(db, Path("prompts"))              # bundled files are the fallbacks
    row, created = await service.push("phone-assistant", content, by="alice")
    await service.repo.set_label("phone-assistant", "production", row.version, by="alice")
    resolved = await service.resolve("phone-assistant", "production", user_id="u1")
    messages = service.render(resolved, {"today": "2026-11-24"})

The pieces: :mod:`~keel.prompts.spec` (what a version holds, prompt files), :mod:`~keel.prompts.render` (sandboxed
templates), :mod:`~keel.prompts.repository` (tables and queries), :mod:`~keel.prompts.service` (resolving with a
cache and fallbacks, experiments, stats, auto-rollback); the pipeline stage is :mod:`keel.pipeline.prompt`.
"""

from __future__ import annotations

from keel.prompts.render import CompiledPrompt
from keel.prompts.repository import PromptRepository, VersionStats
from keel.prompts.service import (
    AUTO_ROLLBACK,
    ManagedSystemPrompt,
    PromptService,
    PromptSnapshot,
    ResolvedPrompt,
    RollbackEvent,
    RollbackRule,
    in_treatment,
)
from keel.prompts.spec import PromptContent, PromptFile, load_prompt_dir

__all__ = [
    "AUTO_ROLLBACK",
    "CompiledPrompt",
    "ManagedSystemPrompt",
    "PromptContent",
    "PromptFile",
    "PromptRepository",
    "PromptService",
    "PromptSnapshot",
    "ResolvedPrompt",
    "RollbackEvent",
    "RollbackRule",
    "VersionStats",
    "in_treatment",
    "load_prompt_dir",
]
