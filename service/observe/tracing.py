"""OpenTelemetry traces: a span per session, per call (child of its session) and per engine
request (child of its call), so a trace shows which calls form one app and what each waited on.

Off by default, at no cost: ``NoTracing`` does nothing and opentelemetry is never imported.
``tracing_from_env`` turns it on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
``console``), reading the other standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ...) through the SDK. Needs ``pip install "parrot-serve[otel]"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

AttributeValue = str | int | float | bool


class Span(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> Any: ...
    def end(self, end_time: int | None = None) -> None: ...


class Tracing:
    """What the service asks of a tracer; this base records nothing."""

    enabled = False

    def start_session(self, session_id: str, attributes: Mapping[str, AttributeValue]) -> None:
        return None

    def end_session(self, session_id: str, error: str | None = None) -> None:
        return None

    def start_call(self, session_id: str | None, attributes: Mapping[str, AttributeValue]) -> Span | None:
        """A call's span, a child of its session's, made current for the rest of the calling task
        (a call's own task), so its engine requests become its children."""
        return None

    def start_request(self, attributes: Mapping[str, AttributeValue]) -> Span | None:
        """An engine request's span, a child of the current call span if any."""
        return None

    def end_span(self, span: Span | None, attributes: Mapping[str, AttributeValue],
                 error: str | None = None) -> None:
        return None

    def shutdown(self) -> None:
        return None


class NoTracing(Tracing):
    pass


class OtelTracing(Tracing):
    """Spans through an OpenTelemetry ``TracerProvider`` (the SDK's, or one a test builds)."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, trace

        self._trace = trace
        self._context = context
        self._provider = provider
        self._tracer = provider.get_tracer("parrot.service")
        self._sessions: dict[str, Any] = {}

    def start_session(self, session_id: str, attributes: Mapping[str, AttributeValue]) -> None:
        span = self._tracer.start_span("parrot.session", context=self._context.Context(),  # a root
                                       attributes=dict(attributes))
        self._sessions[session_id] = span

    def end_session(self, session_id: str, error: str | None = None) -> None:
        span = self._sessions.pop(session_id, None)
        if span is not None:
            self.end_span(span, {}, error)

    def start_call(self, session_id: str | None, attributes: Mapping[str, AttributeValue]) -> Span | None:
        parent = self._sessions.get(session_id) if session_id else None
        ctx = self._trace.set_span_in_context(parent) if parent is not None else self._context.Context()
        span = self._tracer.start_span("parrot.call", context=ctx, attributes=dict(attributes))
        # Not detached: the context is the task's own copy, and the task ends with the call.
        self._context.attach(self._trace.set_span_in_context(span))
        return span

    def start_request(self, attributes: Mapping[str, AttributeValue]) -> Span | None:
        return self._tracer.start_span("parrot.engine_request", attributes=dict(attributes))

    def end_span(self, span: Span | None, attributes: Mapping[str, AttributeValue],
                 error: str | None = None) -> None:
        if span is None:
            return
        for key, value in attributes.items():
            span.set_attribute(key, value)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))  # type: ignore[attr-defined]
        span.end()

    def shutdown(self) -> None:
        for session_id in list(self._sessions):
            self.end_session(session_id)
        shutdown = getattr(self._provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


class TracingConfigError(ValueError):
    """The OTEL_* settings ask for something this install cannot do; the message says what."""


def tracing_from_env(environ: Mapping[str, str] | None = None) -> Tracing:
    """``OtelTracing`` when ``OTEL_TRACES_EXPORTER`` names exporters (comma-separated: ``otlp``,
    ``console``) and ``OTEL_SDK_DISABLED`` is not true; else ``NoTracing``."""
    env = os.environ if environ is None else environ
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return NoTracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise TracingConfigError('OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: '
                                 'pip install "parrot-serve[otel]"') from None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "parrot")})
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                               env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
            try:
                if protocol == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                else:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[no-redef]
                        OTLPSpanExporter,
                    )
            except ImportError:
                package = "grpc" if protocol == "grpc" else "http"
                raise TracingConfigError(f"the OTLP exporter over {protocol} is not installed: pip install "
                                         f"opentelemetry-exporter-otlp-proto-{package}") from None
            exporter = OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*
        else:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, "
                                     "console or none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return OtelTracing(provider)
