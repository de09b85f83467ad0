"""The request pipeline: an ordered list of stages in front of the model router.

A stage is an async callable taking the :class:`~keel.context.RequestContext`. It may raise a ``KeelError`` to
refuse the request, change what is asked (a budget downgrade swaps ``ctx.public_model``), or ``ctx.defer(...)``
work to run when the response is complete (settling limits, the ledger row, the log line). Stages run in order
and each one's time lands in ``ctx.timings``.
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

    async def _stages(self, ctx: RequestContext) -> None:
        for stage in self.stages:
            t0 = time.perf_counter()
            await stage(ctx)
            ctx.timings[stage.name] = (time.perf_counter() - t0) * 1000

    async def chat(self, ctx: RequestContext) -> dict[str, Any] | PrimedStream:
        """Run the stages, then the model: a completion dict, or a primed stream when ``ctx.stream``."""
        await self._stages(ctx)
        if ctx.stream:
            return await self.router.stream(ctx, ctx.body)
        return await self.router.complete(ctx, ctx.body)

    async def embed(self, ctx: RequestContext) -> dict[str, Any]:
        await self._stages(ctx)
        return await self.router.embed(ctx, ctx.body)
