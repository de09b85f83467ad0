"""The FastAPI application factory: builds the backends from config, mounts the routes, owns their lifetimes."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from keel.api import admin, guardrails, health, openai, prompts, sessions
from keel.api.http import RequestIdMiddleware, error_response, internal_error
from keel.api.state import AppState
from keel.config import KeelConfig, load_config
from keel.embed import build_embedder
from keel.errors import InvalidRequest, KeelError
from keel.guard.registry import build_guards, warm_up
from keel.history import History
from keel.llm.client import UpstreamClient
from keel.llm.pricing import PriceBook
from keel.llm.registry import build_provider
from keel.llm.router import Router
from keel.observe.logs import setup_logging, shutdown_logging
from keel.observe.metrics import observe_gc_pauses, register_models
from keel.pipeline import Pipeline, Stage
from keel.pipeline.accounting import Accounting
from keel.pipeline.admission import AdmissionStage, EmergencyMode
from keel.pipeline.auth import Authenticator, AuthStage
from keel.pipeline.prompt import ShadowRunner
from keel.prompts import ManagedSystemPrompt, PromptService
from keel.retrieval import Retriever
from keel.state import counters_from_url
from keel.store import Database, KeyRepository, ScopeLimitsRepository, SpendRepository, default_sqlite_url
from keel.store.sessions import RetentionSweeper, SessionRepository
from keel.store.writer import BatchWriter
from keel.vector import build_index

__all__ = ["app_factory", "create_app"]

log = logging.getLogger("keel.app")


def create_app(config: KeelConfig) -> FastAPI:
    """An app for ``config``. Backends start in the lifespan, so building the app does no I/O."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pool of upstream connections per worker, for every model and embeddings call. It keeps no cookies:
        # it is shared by every tenant, and a cookie one upstream response sets (a load balancer's, say) must not
        # ride along on everybody's later requests.
        client = UpstreamClient(limit=config.server.upstream_connections)
        router = Router(config, lambda d: build_provider(d, client))
        register_models(router.names)
        observe_gc_pauses()
        try:  # a bad guardrail option stops the start, before anything else opens
            guards = build_guards(config, router=router)
        except BaseException:
            await router.aclose()
            await client.aclose()
            raise
        setup_logging(config.logging)
        db = Database.from_url(config.database_url or default_sqlite_url())
        await db.migrate()
        counters = counters_from_url(config.redis_url)
        keys, limits, spend = KeyRepository(db), ScopeLimitsRepository(db), SpendRepository(db)
        ledger: BatchWriter[dict[str, Any]] = BatchWriter(
            spend.insert_many,
            interval_s=config.accounting.flush_interval_s,
            max_batch=config.accounting.max_batch,
            name="spend ledger",
        )
        await ledger.start()
        master = config.auth.master_key.get_secret_value() if config.auth.master_key else None
        auth = Authenticator(master, keys, limits, config.auth.key_cache_ttl_s)
        prices = PriceBook(config.models)
        cap = config.budgets.global_daily_usd
        emergency = EmergencyMode(counters, round(cap * 1_000_000) if cap else None)
        admission = AdmissionStage(config, counters, prices, spend, emergency)
        stages: list[Stage] = [AuthStage(auth), admission]
        accounting = Accounting(prices, ledger, charge=admission.charge)
        prompt_service = PromptService(
            db, Path(config.prompts_dir) if config.prompts_dir else None, known_models=router.names
        )
        await prompt_service.start()
        shadows = ShadowRunner(router, accounting)
        chat_sessions = SessionRepository(db)
        history = History(config, router, chat_sessions, accounting)
        retention = RetentionSweeper(chat_sessions, config.sessions.retention_days)
        await retention.start()
        embedder = build_embedder(config.embeddings, client)
        vectors = build_index(config.vector_store)
        if guards:
            await warm_up(guards, embedder.embed)
        app.state.keel = AppState(
            config=config,
            upstream=client,
            router=router,
            pipeline=Pipeline(stages, router),
            started=int(time.time()),
            db=db,
            counters=counters,
            keys=keys,
            limits=limits,
            spend=spend,
            ledger=ledger,
            auth=auth,
            emergency=emergency,
            accounting=accounting,
            prompts=prompt_service,
            sessions=chat_sessions,
            history=history,
            system_prompts=ManagedSystemPrompt(prompt_service, shadows),
            context_source=Retriever(embedder, vectors),
            embedder=embedder,
            vectors=vectors,
            guards=guards,
        )
        for deployment in prices.unpriced():
            log.warning(
                "no price for deployment %s: its cost is reported as unknown; set `price` in the config", deployment
            )
        log.info(
            "keel ready",
            extra={
                "fields": {
                    "models": router.names,
                    "database": db.redacted_url,
                    "auth": "master key" if master else "open",
                }
            },
        )
        # What start-up built (modules, config, models, caches) lives as long as the process. Frozen, it is left
        # out of the collector's full passes, which otherwise stopped the event loop for 70-100 ms (166k tracked
        # objects) every few thousand requests: every request in flight waited.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await retention.stop()
            await embedder.aclose()
            await vectors.aclose()
            await history.aclose()
            await prompt_service.aclose()
            await shadows.aclose()
            await router.aclose()
            await client.aclose()
            await ledger.stop()
            await counters.aclose()
            await db.dispose()
            shutdown_logging()

    app = FastAPI(title="Keel", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    # The routes every model call takes, which keel.api.protocol serves without ASGI under `keel serve`.
    app.state.hot_routes = {
        (b"POST", path.encode()): handler for path, handler in {**openai.HOT_ROUTES, **guardrails.HOT_ROUTES}.items()
    }
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(prompts.router)
    app.include_router(sessions.router)
    app.include_router(guardrails.router)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        err = KeelError(str(exc.detail), status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            err.message = f"Unknown path {request.url.path}; see /docs for the API."
        elif exc.status_code == 405:
            err.message = f"Method {request.method} is not allowed on {request.url.path}."
        return error_response(err, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error_response(InvalidRequest(f"Invalid value for '{param}': {first.get('msg')}.", param=param))

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> Response:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        rid = getattr(request.state, "request_id", "-")
        log.exception("unhandled error", extra={"fields": {"request_id": rid, "path": request.url.path}})
        return internal_error(rid)

    return app


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory`` and worker processes: the config named by ``KEEL_CONFIG``."""
    return create_app(load_config())
