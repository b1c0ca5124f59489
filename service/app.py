"""The Parrot HTTP service: ``create_app(engine)`` wires routers, metrics and error handling.

The engine starts and stops with the app (FastAPI lifespan). Everything the app
needs hangs off ``app.state``; nothing is module-global, so several apps (each with
its own engine and metrics registry) can live in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import APIRouter, FastAPI, Request, Response

from parrot.service.engine.base import Engine
from parrot.service.errors import install_exception_handlers
from parrot.service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from parrot.service.native.api_router import router as native_router
from parrot.service.native.executor import Executor
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


@ops_router.get("/v1/engines")
async def list_engines(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    return {
        "object": "list",
        "data": [{
            "name": engine_name(engine),
            "model": engine.model_name,
            "max_context_len": engine.max_context_len,
            "load": asdict(engine.load()),
        }],
    }


def engine_name(engine: Engine) -> str:
    """``BuiltinEngine`` -> ``"builtin"``; the same short names the design uses."""
    name = type(engine).__name__
    return name.removesuffix("Engine").lower() or name


def create_app(engine: Engine, *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               session_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> FastAPI:
    sessions = SessionManager(Executor(engine), session_idle_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        await sessions.start()
        try:
            yield
        finally:
            await sessions.stop()
            await engine.shutdown()

    app = FastAPI(title="Parrot", summary="Serving LLM applications", lifespan=lifespan)
    service_metrics = ServiceMetrics(engine)
    app.state.engine = engine
    app.state.metrics = service_metrics
    app.state.sessions = sessions
    app.state.openai_serving = OpenAIServing(
        engine, metrics=service_metrics, default_max_tokens=default_max_tokens
    )
    install_exception_handlers(app)
    app.add_middleware(HTTPMetricsMiddleware, metrics=service_metrics)
    app.include_router(ops_router)
    app.include_router(openai_router)
    app.include_router(native_router)
    return app
