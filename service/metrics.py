"""Prometheus metrics of one service instance, all named ``parrot_*``.

Each app owns its ``CollectorRegistry`` (never the process-global one), so two apps
in one process (tests, embedded mode) keep separate counts. Request metrics follow
vLLM's names and buckets where they overlap (``vllm:time_to_first_token_seconds`` is
``parrot_time_to_first_token_seconds`` here, and so on), so its dashboards port.
Engine gauges are read once per scrape from every engine's ``load()``, labelled with
the engine's id. Labels are bounded: endpoint, objective, tenant (configured names),
outcome, engine id; never a session, call or request id.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot.service.dispatch.registry import EngineRegistry

# vLLM's bucket lists (vllm/v1/metrics), so quantiles compare across the two.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# The service-side wait is usually short (an engine to join, a shared prefill): TTFT's finer list.
QUEUE_TIME_BUCKETS = TTFT_BUCKETS


class _EngineLoadCollector(Collector):
    def __init__(self, engines: EngineRegistry) -> None:
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        handles = list(self.engines.handles.values())  # those marked down too
        loads = [(h.id, h.engine.load()) for h in self.engines.engines()]  # those taking work
        for name, doc, field in (
            ("parrot_num_requests_running", "Requests the engine is running (its batch).", "num_running"),
            ("parrot_num_requests_waiting", "Requests queued in the engine.", "num_waiting"),
            ("parrot_kv_tokens_used", "KV cache slots in use (cached prefixes included).",
             "kv_tokens_used"),
            ("parrot_kv_tokens_total", "KV cache slots in all.", "kv_tokens_total"),
            ("parrot_prefix_cache_tokens", "Tokens held by the prefix cache.", "cached_tokens"),
        ):
            family = GaugeMetricFamily(name, doc, labels=["engine"])
            for engine_id, load in loads:
                family.add_metric([engine_id], getattr(load, field))
            yield family
        usage = GaugeMetricFamily("parrot_kv_cache_usage_perc", "Fraction of KV cache slots in use (0-1).",
                                  labels=["engine"])
        preemptions = CounterMetricFamily("parrot_num_preemptions", "Requests the engine preempted.",
                                          labels=["engine"])
        steps = CounterMetricFamily("parrot_engine_steps", "Forward passes the engine ran.",
                                    labels=["engine"])
        busy = CounterMetricFamily("parrot_engine_busy_seconds", "Time the engine spent running steps "
                                   "(its utilization is this counter's rate).", labels=["engine"])
        for engine_id, load in loads:
            usage.add_metric([engine_id], load.kv_tokens_used / load.kv_tokens_total
                             if load.kv_tokens_total else 0.0)
            preemptions.add_metric([engine_id], load.num_preemptions)
            steps.add_metric([engine_id], load.num_steps)
            busy.add_metric([engine_id], load.busy_s)
        yield usage
        yield preemptions
        yield steps
        yield busy
        up = GaugeMetricFamily("parrot_engine_up", "1 while the engine takes work, 0 while it is down.",
                               labels=["engine", "kind", "model"])
        for h in handles:
            up.add_metric([h.id, h.kind, h.model], float(h.down is None and h.engine.alive))
        yield up


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engines: EngineRegistry) -> None:
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter(
            "parrot_http_requests", "HTTP requests answered.", ["method", "route", "status"],
            registry=registry,
        )
        # ---- engine requests (one per generation; a native call makes one per output) ----
        self.requests = Counter(
            "parrot_requests", "Engine requests by face (endpoint), objective, tenant and how they ended "
            "(stop, length, abort, error).", ["endpoint", "objective", "tenant", "finish_reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "parrot_prompt_tokens", "Prompt tokens of finished requests.", ["tenant"], registry=registry
        )
        self.generation_tokens = Counter(
            "parrot_generation_tokens", "Tokens generated.", ["tenant"], registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "parrot_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", ["tenant"],
            registry=registry,
        )
        # vLLM's pair: the hit rate is rate(hits) / rate(queries), in tokens.
        self.prefix_cache_queries = Counter(
            "parrot_prefix_cache_queries", "Prompt tokens looked up in a prefix cache.", ["engine"],
            registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "parrot_prefix_cache_hits", "Prompt tokens found in a prefix cache.", ["engine"],
            registry=registry,
        )
        self.ttft = Histogram(
            "parrot_time_to_first_token_seconds", "Time from a request reaching the dispatcher to its "
            "first output token.", ["objective"], buckets=TTFT_BUCKETS, registry=registry,
        )
        self.tpot = Histogram(
            "parrot_time_per_output_token_seconds", "Mean time per output token after the first, per "
            "request.", ["objective"], buckets=TPOT_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "parrot_e2e_request_latency_seconds", "Time from a request reaching the dispatcher to its "
            "last token.", ["objective"], buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.queue_time = Histogram(
            "parrot_request_queue_time_seconds", "Time a request waited in the service before an engine "
            "took it (an engine to join, a shared-prefix prefill).", ["objective"],
            buckets=QUEUE_TIME_BUCKETS, registry=registry,
        )
        # ---- app level: calls of sessions' graphs ----
        self.calls = Counter(
            "parrot_calls", "Semantic calls (LLM calls of session graphs) by objective, tenant and how "
            "they ended (done, failed, cancelled).", ["objective", "tenant", "outcome"], registry=registry,
        )
        self.call_latency = Histogram(
            "parrot_call_latency_seconds", "Time from a call becoming ready (its inputs set) to its last "
            "output, for calls that finished.", ["objective"], buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.call_wait = Histogram(
            "parrot_call_dependency_wait_seconds", "Time a call waited for its inputs (its producers) "
            "after it was submitted.", ["objective"], buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.session_makespan = Histogram(
            "parrot_session_makespan_seconds", "Time from a session graph's first call submitted to its "
            "last call done (an app's end-to-end time), for graphs whose calls all finished.",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.sessions_created = Counter(
            "parrot_sessions_created", "Sessions created.", ["tenant"], registry=registry
        )
        self.sessions_open = Gauge("parrot_sessions_open", "Sessions open.", registry=registry)
        registry.register(_EngineLoadCollector(engines))

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
