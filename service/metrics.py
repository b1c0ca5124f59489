"""Prometheus metrics of one service instance.

Each app owns its ``CollectorRegistry`` (never the process-global one), so two apps
in one process (tests, embedded mode) keep separate counts. Engine load is read
once per scrape from every engine's ``load()``, labelled with the engine's id.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot.service.dispatch.registry import EngineRegistry
from parrot.service.engine.base import GenerateOutput


class _EngineLoadCollector(Collector):
    def __init__(self, engines: EngineRegistry) -> None:
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        handles = self.engines.engines()
        loads = [(h.id, h.engine.load()) for h in handles]
        for name, doc, field in (
            ("parrot_num_requests_running", "Requests the engine is running.", "num_running"),
            ("parrot_num_requests_waiting", "Requests waiting in the engine.", "num_waiting"),
            ("parrot_kv_tokens_used", "KV cache slots in use (cached prefixes included).",
             "kv_tokens_used"),
            ("parrot_kv_tokens_total", "KV cache slots in all.", "kv_tokens_total"),
            ("parrot_prefix_cache_tokens", "Tokens held by the prefix cache.", "cached_tokens"),
        ):
            family = GaugeMetricFamily(name, doc, labels=["engine"])
            for engine_id, load in loads:
                family.add_metric([engine_id], getattr(load, field))
            yield family


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engines: EngineRegistry) -> None:
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter(
            "parrot_http_requests", "HTTP requests answered.", ["method", "route", "status"],
            registry=registry,
        )
        self.requests = Counter(
            "parrot_requests", "Generation requests (one per prompt) by how they ended.",
            ["endpoint", "finish_reason"], registry=registry,
        )
        self.prompt_tokens = Counter(
            "parrot_prompt_tokens", "Prompt tokens of finished requests.", registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "parrot_cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
            registry=registry,
        )
        self.generation_tokens = Counter(
            "parrot_generation_tokens", "Tokens generated.", registry=registry
        )
        registry.register(_EngineLoadCollector(engines))

    def record_finished(self, endpoint: str, out: GenerateOutput) -> None:
        reason = "error" if out.error else (out.finish_reason or "unknown")
        self.requests.labels(endpoint, reason).inc()
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.cached_prompt_tokens.inc(out.num_cached_tokens)
        self.generation_tokens.inc(out.num_output_tokens)

    def record_aborted(self, endpoint: str, count: int) -> None:
        """Requests the service aborted because their client went away."""
        if count:
            self.requests.labels(endpoint, "abort").inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts answered HTTP requests by route template (not raw path, to bound the labels).

    A plain ASGI middleware: unlike ``BaseHTTPMiddleware`` it leaves streaming and
    disconnect detection alone.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                status = str(message["status"])
                self.metrics.http_requests.labels(scope["method"], path, status).inc()
            await send(message)

        await self.app(scope, receive, send_counting)
