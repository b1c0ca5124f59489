"""The Parrot HTTP service: ``create_app(engines)`` wires routers, metrics and error handling.

Engines start and stop with the app (FastAPI lifespan): the in-process ones given
here, plus engine processes that register over HTTP later. Everything the app needs
hangs off ``app.state``; nothing is module-global, so several apps (each with its
own engines and metrics registry) can live in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from parrot.limits import MAX_BODY_BYTES
from parrot.service.api.auth import require_operator, require_tenant
from parrot.service.api.engines import router as engines_router
from parrot.service.api.limits import BodySizeLimitMiddleware
from parrot.service.api.native import router as native_router
from parrot.service.api.observe import install_dashboard
from parrot.service.api.openai.router import router as openai_router
from parrot.service.api.openai.serving import DEFAULT_MAX_TOKENS, OpenAIServing
from parrot.service.api.ops import router as ops_router
from parrot.service.api.responses.router import router as responses_router
from parrot.service.api.tokenize import router as tokenize_router
from parrot.service.dispatch.dispatcher import DEFAULT_ENGINE_WAIT_S, Dispatcher
from parrot.service.dispatch.registry import DEFAULT_EXPIRY_S, DEFAULT_PROBE_INTERVAL_S, EngineRegistry
from parrot.service.dispatch.scheduler import GlobalScheduler
from parrot.service.drain import DEFAULT_DRAIN_TIMEOUT_S, Drain, install_drain
from parrot.service.engine.base import Engine
from parrot.service.errors import install_exception_handlers
from parrot.service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from parrot.service.observe.observer import DEFAULT_SAMPLE_INTERVAL_S, Observer
from parrot.service.observe.tracing import Tracing, tracing_from_env
from parrot.service.runtime.executor import PREFILL_AHEAD_MIN_TOKENS, Executor
from parrot.service.runtime.sessions import DEFAULT_IDLE_TIMEOUT_S, SessionManager
from parrot.service.tenancy import Tenants


def create_app(engines: Engine | Sequence[Engine] = (), *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               session_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
               engine_expiry_s: float = DEFAULT_EXPIRY_S,
               engine_probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
               engine_wait_s: float = DEFAULT_ENGINE_WAIT_S,
               drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
               tenants: Tenants | None = None,
               max_body_bytes: int = MAX_BODY_BYTES,
               log_prompts: bool = False,
               tracing: Tracing | None = None,
               observe_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
               prefill_ahead_min_tokens: int | None = PREFILL_AHEAD_MIN_TOKENS) -> FastAPI:
    """The service over ``engines`` (started with it: the builtin engine, SGLang or
    OpenAI-compatible servers); with none, it waits for engine processes to register.
    ``tenants``: the API keys, limits and operator credentials (none: open to anyone).
    ``log_prompts``: put prompt and output text in the request log lines (off: never).
    ``tracing``: OpenTelemetry spans (default: from the OTEL_* environment, off when unset).
    ``observe_interval_s``: how often engine load is sampled for the dashboard.
    ``prefill_ahead_min_tokens``: the shortest known prompt start of a call still waiting for
    its inputs that is prefilled ahead (None: never; see parrot.service.runtime.executor)."""
    registry = EngineRegistry(expiry_s=engine_expiry_s, probe_interval_s=engine_probe_interval_s)
    for engine in [engines] if isinstance(engines, Engine) else engines:
        registry.add(engine)
    scheduler = GlobalScheduler()
    registry.on_removed.append(scheduler.forget)
    service_metrics = ServiceMetrics(registry)
    observer = Observer(service_metrics, tracing if tracing is not None else tracing_from_env(),
                        log_prompts=log_prompts, sample_interval_s=observe_interval_s)
    dispatcher = Dispatcher(registry, scheduler, observer=observer, engine_wait_s=engine_wait_s)
    executor = Executor(dispatcher, prefill_ahead_min_tokens=prefill_ahead_min_tokens)
    sessions = SessionManager(executor, session_idle_timeout_s)
    drain = Drain(sessions, drain_timeout_s)  # app.state.drain.run(): see parrot.service.drain

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        await sessions.start()
        await observer.start(registry)
        try:
            yield
        finally:
            drain.cancel_calls()  # what a drain left (or all, without one) fails with the cause
            await sessions.stop()
            await observer.stop()
            await registry.stop()

    app = FastAPI(title="Parrot", summary="Serving LLM applications", lifespan=lifespan)
    app.state.registry = registry
    app.state.scheduler = scheduler
    app.state.dispatcher = dispatcher
    app.state.metrics = service_metrics
    app.state.observer = observer
    app.state.sessions = sessions
    app.state.tenants = tenants or Tenants()
    app.state.openai_serving = OpenAIServing(dispatcher, default_max_tokens=default_max_tokens)
    install_exception_handlers(app)
    install_drain(app, drain)  # inside the metrics middleware, so refusals are counted
    app.add_middleware(HTTPMetricsMiddleware, metrics=service_metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)  # outermost: 413 first
    app.include_router(ops_router)
    app.include_router(engines_router, dependencies=[Depends(require_operator)])
    app.include_router(openai_router, dependencies=[Depends(require_tenant)])
    app.include_router(tokenize_router, dependencies=[Depends(require_tenant)])
    app.include_router(responses_router, dependencies=[Depends(require_tenant)])
    app.include_router(native_router, dependencies=[Depends(require_tenant)])
    install_dashboard(app)  # /v1/observe (operator) and /dashboard
    return app
