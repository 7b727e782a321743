"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.deps import require_api_key
from service.engine import ScoringEngine
from service.errors import error_responses, install_error_handlers
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, InternalErrorMiddleware, MetricsMiddleware
from service.model_manager import ModelManager
from service.routes import (
    adapt,
    docs,
    get_reward,
    health,
    jobs,
    limits,
    metrics,
    models,
    pooling,
    preference,
    score,
)
from service.settings import ServiceSettings
from worker.client import JobClient

log = logging.getLogger(__name__)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = ScoringEngine(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            metrics=app_metrics,
        )
        manager = ModelManager(settings, app_metrics, engine)
        app.state.engine = engine
        app.state.models = manager
        app.state.jobs = JobClient(settings)
        engine.start()
        # Loading takes seconds to minutes: do it off the event loop so /health answers
        # and /ready says 503 meanwhile; then follow registry promotions.
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(None, manager.load_initial)
        loading.add_done_callback(lambda _: manager.start_watching())
        try:
            yield
        finally:
            manager.stop_watching()
            engine.stop()
            app.state.jobs.close()
            if not loading.done():
                log.info("shutting down while the model is still loading")

    docs_protected = bool(settings.api_key) and not settings.public_docs
    app = FastAPI(
        title="generalrm",
        summary="Reward-model scoring and meta-learning service for RLHF",
        version="0.1.0",
        lifespan=lifespan,
        # behind the API key unless GENERALRM_PUBLIC_DOCS: the schema maps the whole surface
        openapi_url=None if docs_protected else "/openapi.json",
        docs_url=None if docs_protected else "/docs",
        redoc_url=None if docs_protected else "/redoc",
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)

    app.include_router(health.router, tags=["health"])
    protected = [Depends(require_api_key)]
    unauthorized = error_responses(401)
    app.include_router(health.ready_router, dependencies=protected, tags=["health"],
                       responses=unauthorized)
    for module in (score, preference, get_reward, pooling, adapt, models, jobs, limits, metrics):
        app.include_router(module.router, dependencies=protected, responses=unauthorized)
    if docs_protected:
        app.include_router(docs.router, dependencies=protected)
    return app
