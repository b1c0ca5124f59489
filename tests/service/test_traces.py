"""OpenTelemetry traces: session -> call -> engine request spans with their parent links; off (and
the SDK never loaded) unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.observe.tracing import NoTracing, TracingConfigError, tracing_from_env
from tests.service.observe_workload import submit_map_reduce

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason='needs the otel extra: pip install ".[otel]"')


@pytest.fixture
def exporter():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def test_session_call_and_engine_spans_link_up(tiny_engine_factory, serve_app, exporter):
    from parrot.service.observe.tracing import OtelTracing

    provider, memory = exporter
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine, tracing=OtelTracing(provider))) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            # Deleting the session at the end ends its span.
            app = submit_map_reduce(http, num_maps=3, max_tokens=4, delete=True)
            http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).raise_for_status()
    spans = memory.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    [session] = by_name["parrot.session"]
    assert session.parent is None and session.attributes["parrot.session.id"] == app.session_id
    calls = {s.attributes["parrot.call.id"]: s for s in by_name["parrot.call"]}
    assert set(calls) == set(app.call_ids)
    trace_id = session.context.trace_id
    for call in calls.values():
        assert call.parent.span_id == session.context.span_id and call.context.trace_id == trace_id
        assert call.attributes["parrot.call.state"] == "done"
        assert call.attributes["gen_ai.usage.output_tokens"] == 4
    requests = by_name["parrot.engine_request"]
    native = [s for s in requests if s.attributes["parrot.endpoint"] == "native"]
    assert sorted(s.attributes["parrot.call.id"] for s in native) == sorted(app.call_ids)
    for span in native:
        call = calls[span.attributes["parrot.call.id"]]
        assert span.parent.span_id == call.context.span_id and span.context.trace_id == trace_id
        assert span.attributes["parrot.engine.id"] == "engine-0"
        assert span.attributes["gen_ai.usage.output_tokens"] == 4
        assert call.start_time <= span.start_time <= span.end_time <= call.end_time
    # The reduce ran after every map it read.
    reduce = calls["reduce"]
    assert all(calls[m].end_time <= reduce.end_time for m in app.map_ids)
    # An OpenAI request belongs to no session: its engine span is a trace of its own.
    [single] = [s for s in requests if s.attributes["parrot.endpoint"] == "completions"]
    assert single.parent is None and single.context.trace_id != trace_id


def test_tracing_is_off_unless_an_exporter_is_named():
    assert isinstance(tracing_from_env({}), NoTracing)
    assert isinstance(tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}), NoTracing)
    assert isinstance(tracing_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}),
                      NoTracing)
    on = tracing_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "parrot-test"})
    assert on.enabled
    on.shutdown()
    with pytest.raises(TracingConfigError, match="unknown exporter 'zipkinx'"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkinx"})


def test_no_tracing_loads_no_opentelemetry_sdk():
    code = ("import sys\n"
            "from parrot.service.app import create_app\n"
            "app = create_app()\n"
            "print(type(app.state.observer.tracing).__name__,\n"
            "      [m for m in sys.modules if m.startswith('opentelemetry.sdk')])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "NoTracing []"
