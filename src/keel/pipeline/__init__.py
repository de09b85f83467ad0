"""The request pipeline: an ordered list of stages in front of the model router.

A stage is an async callable taking the :class:`~keel.context.RequestContext`. It may raise a ``KeelError`` to
refuse the request, set ``ctx.result`` to answer without the model (a cache hit), or ``ctx.defer(...)`` work to
run when the response is complete (spend settlement, logging). A route picks which stages run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from keel.context import RequestContext
from keel.llm.router import PrimedStream, Router

__all__ = ["Pipeline", "Stage"]


class Stage(Protocol):
    name: str

    async def __call__(self, ctx: RequestContext) -> None: ...


class Pipeline:
    def __init__(self, stages: Sequence[Stage], router: Router) -> None:
        self.stages = tuple(stages)
        self.router = router

    async def chat(self, ctx: RequestContext) -> dict[str, Any] | PrimedStream:
        """Run the stages, then the model: a completion dict, or a primed stream when ``ctx.stream``."""
        for stage in self.stages:
            t0 = time.perf_counter()
            await stage(ctx)
            ctx.timings[stage.name] = (time.perf_counter() - t0) * 1000
        if ctx.stream:
            return await self.router.stream(ctx, ctx.body)
        return await self.router.complete(ctx, ctx.body)
