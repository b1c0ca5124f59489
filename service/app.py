"""The Parrot HTTP service: ``create_app(engines)`` wires routers, metrics and error handling.

Engines start and stop with the app (FastAPI lifespan): the in-process ones given
here, plus engine processes that register over HTTP later. Everything the app needs
hangs off ``app.state``; nothing is module-global, so several apps (each with its
own engines and metrics registry) can live in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response

from parrot.service.cluster.api_router import router as engines_router
from parrot.service.cluster.placement import GlobalScheduler
from parrot.service.cluster.registry import DEFAULT_EXPIRY_S, EngineRegistry
from parrot.service.engine.base import Engine
from parrot.service.errors import install_exception_handlers
from parrot.service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from parrot.service.native.api_router import router as native_router
from parrot.service.native.executor import DEFAULT_ENGINE_WAIT_S, Executor
from parrot.service.native.sessions import DEFAULT_IDLE_TIMEOUT_S, SessionManager
from parrot.service.openai.api_router import router as openai_router
from parrot.service.openai.serving import DEFAULT_MAX_TOKENS, OpenAIServing

ops_router = APIRouter(tags=["ops"])


@ops_router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops_router.get("/metrics")
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=service_metrics.content_type)


def create_app(engines: Engine | Sequence[Engine] = (), *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               session_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
               engine_expiry_s: float = DEFAULT_EXPIRY_S,
               engine_wait_s: float = DEFAULT_ENGINE_WAIT_S) -> FastAPI:
    """The service over ``engines`` (in-process); with none, it waits for engine processes."""
    registry = EngineRegistry(expiry_s=engine_expiry_s)
    for engine in [engines] if isinstance(engines, Engine) else engines:
        registry.add_local(engine)
    scheduler = GlobalScheduler()
    registry.on_removed.append(scheduler.forget)
    sessions = SessionManager(Executor(registry, scheduler, engine_wait_s=engine_wait_s),
                              session_idle_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        await sessions.start()
        try:
            yield
        finally:
            await sessions.stop()
            await registry.stop()

    app = FastAPI(title="Parrot", summary="Serving LLM applications", lifespan=lifespan)
    service_metrics = ServiceMetrics(registry)
    app.state.registry = registry
    app.state.scheduler = scheduler
    app.state.metrics = service_metrics
    app.state.sessions = sessions
    app.state.openai_serving = OpenAIServing(
        registry, scheduler, metrics=service_metrics, default_max_tokens=default_max_tokens
    )
    install_exception_handlers(app)
    app.add_middleware(HTTPMetricsMiddleware, metrics=service_metrics)
    app.include_router(ops_router)
    app.include_router(engines_router)
    app.include_router(openai_router)
    app.include_router(native_router)
    return app
