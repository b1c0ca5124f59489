"""/metrics and /v1/observe as a known app runs: counters and histograms move by what the app did,
labels stay bounded, names and buckets match vLLM's, and the observe routes are operator-only."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from parrot.service.app import create_app
from parrot.service.metrics import REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from parrot.service.observe.views import critical_path
from parrot.service.runtime.graph import Call
from parrot.service.tenancy import TenantConfig, Tenants
from tests.service.observe_workload import submit_map_reduce

ALLOWED_LABELS = {"method", "route", "status", "endpoint", "objective", "tenant", "finish_reason", "outcome",
                  "engine", "kind", "model", "le"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def scrape(http: httpx.Client) -> list[Sample]:
    text = http.get("/metrics").text
    return [Sample(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(s.value for s in samples if s.name == name and want <= set(s.labels))


def buckets(samples: list[Sample], name: str) -> list[float]:
    return sorted({float(dict(s.labels)["le"]) for s in samples if s.name == f"{name}_bucket"})


def test_metrics_move_with_a_map_reduce_app(live_server):
    with live_server.http() as http:
        before = scrape(http)
        first = submit_map_reduce(http, num_maps=3, max_tokens=6)
        middle = scrape(http)
        app = submit_map_reduce(http, num_maps=3, max_tokens=6)  # the same prompts: cache hits
        time.sleep(0.05)  # the graph's last call is counted as its task ends
        after = scrape(http)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    requests = dict(endpoint="native", objective="latency", tenant="default", finish_reason="length")
    assert moved("parrot_requests_total", **requests) == 2 * 4  # 3 maps + 1 reduce, each to its limit
    assert moved("parrot_calls_total", objective="latency", tenant="default", outcome="done") == 2 * 4
    assert moved("parrot_generation_tokens_total", tenant="default") == 2 * 4 * 6
    prompt = moved("parrot_prompt_tokens_total", tenant="default")
    cached = moved("parrot_cached_prompt_tokens_total", tenant="default")
    cached_second = cached - (total(middle, "parrot_cached_prompt_tokens_total") -
                              total(before, "parrot_cached_prompt_tokens_total"))
    # The second run's prompts were all computed by the first: most of them come from the cache.
    assert prompt > 0 and prompt / 2 * 0.5 < cached_second <= prompt / 2
    assert moved("parrot_prefix_cache_queries_total") == prompt
    assert moved("parrot_prefix_cache_hits_total") == cached
    for histogram in ("parrot_time_to_first_token_seconds", "parrot_time_per_output_token_seconds",
                      "parrot_e2e_request_latency_seconds", "parrot_request_queue_time_seconds",
                      "parrot_call_latency_seconds"):
        assert moved(f"{histogram}_count", objective="latency") == 2 * 4, histogram
        assert moved(f"{histogram}_sum", objective="latency") >= 0
    assert moved("parrot_time_to_first_token_seconds_sum", objective="latency") > 0
    assert moved("parrot_session_makespan_seconds_count") == 2
    makespan = moved("parrot_session_makespan_seconds_sum")
    # The app's makespan covers its critical path (one map, then the reduce) and no more than
    # every call one after another.
    call_time = moved("parrot_call_latency_seconds_sum", objective="latency")
    assert 0 < makespan <= call_time + 0.05
    assert total(after, "parrot_sessions_open") == 2

    engine = "engine-0"
    assert total(after, "parrot_engine_up", engine=engine, kind="builtin", model=live_server.model) == 1
    assert total(after, "parrot_num_preemptions_total", engine=engine) == (
        live_server.engine.scheduler.num_preemptions)
    assert 0 < total(after, "parrot_kv_cache_usage_perc", engine=engine) <= 1  # the cache holds the app
    assert total(after, "parrot_num_requests_running", engine=engine) == 0

    # vLLM's buckets, so its dashboards and alerts port.
    assert buckets(after, "parrot_time_to_first_token_seconds") == [*TTFT_BUCKETS, math.inf]
    assert buckets(after, "parrot_time_per_output_token_seconds") == [*TPOT_BUCKETS, math.inf]
    assert buckets(after, "parrot_e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, math.inf]

    # Bounded labels: no session, call or request id anywhere.
    ids = {first.session_id, app.session_id, *app.call_ids}
    for s in after:
        assert s.name.startswith("parrot_"), s.name
        assert {k for k, _ in s.labels} <= ALLOWED_LABELS, s
        assert not any(v in ids or v.startswith("call-") for _, v in s.labels), s


def test_observe_api_shows_the_graph_its_critical_path_and_the_timeline(live_server):
    with live_server.http() as http:
        app = submit_map_reduce(http, num_maps=3, max_tokens=4)
        graph = http.get(f"/v1/observe/sessions/{app.session_id}").json()
        engines = http.get("/v1/observe/engines").json()["data"]
        # Whether the app's own calls hit the cache depends on how they were batched; a prompt
        # sent twice hits it for sure.
        for _ in range(2):
            http.post("/v1/completions", json={"model": live_server.model, "prompt": "one two three four",
                                               "max_tokens": 1}).raise_for_status()
        summary = http.get("/v1/observe/summary").json()
        http.delete(f"/v1/sessions/{app.session_id}").raise_for_status()
        listed = http.get("/v1/observe/sessions").json()["data"]
        kept = http.get(f"/v1/observe/sessions/{app.session_id}").json()
        missing = http.get("/v1/observe/sessions/nope")
    calls = {c["id"]: c for c in graph["calls"]}
    assert set(calls) == set(app.call_ids)
    assert all(c["state"] == "done" and c["engine"] == "engine-0" for c in calls.values())
    assert {(e["source"], e["target"]) for e in graph["edges"]} == set(app.edges)
    assert all("value" not in v for v in graph["variables"])  # no app text in the view
    path = graph["critical_path"]
    assert len(path) == 2 and path[0] in app.map_ids and path[1] == "reduce"
    assert [c for c in calls if calls[c]["critical"]] == [c for c in app.call_ids if c in path]
    assert graph["makespan_s"] > 0 and graph["states"]["done"] == 4
    # Each call's engine request, with its session and call ids, on the engine's timeline.
    [engine] = engines
    mine = [r for r in engine["requests"] if r["session"] == app.session_id]
    assert sorted(r["call"] for r in mine) == sorted(app.call_ids)
    for r in mine:
        assert r["opened"] <= r["first_token"] <= r["ended"] and r["outcome"] == "length"
    assert engine["samples"] and {"num_running", "num_waiting"} <= set(engine["samples"][-1])
    assert summary["totals"]["generation_tokens"] >= 4 * 4
    assert 0 < summary["cache_hit_rate"] < 1 and summary["engines"][0]["up"] is True
    # A deleted session stays visible (its graph as it ended), flagged.
    assert [s["deleted"] for s in listed if s["id"] == app.session_id] == [True]
    assert kept["deleted"] is True and {c["id"] for c in kept["calls"]} == set(app.call_ids)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_observe_routes_need_the_operator_key_and_label_tenants(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    tenants = Tenants({"alice": TenantConfig(keys=["sk-alice"]), "bob": TenantConfig(keys=["sk-bob"])},
                      admin_keys=["sk-admin"])
    with serve_app(create_app(engine, tenants=tenants)) as url:
        def client(key: str | None) -> httpx.Client:
            return httpx.Client(base_url=url, timeout=30,
                                headers={"Authorization": f"Bearer {key}"} if key else {})

        with client("sk-alice") as alice, client("sk-bob") as bob, client("sk-admin") as admin, \
                client(None) as anonymous:
            app = submit_map_reduce(alice, num_maps=2, max_tokens=3, criterion="throughput")
            bob.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).raise_for_status()
            assert anonymous.get("/v1/observe/summary").status_code == 401
            denied = alice.get("/v1/observe/sessions")
            assert denied.status_code == 403 and "operator" in denied.json()["error"]["message"]
            everyone = admin.get("/v1/observe/sessions").json()["data"]
            only_bob = admin.get("/v1/observe/sessions", params={"tenant": "bob"}).json()["data"]
            only_alice = admin.get("/v1/observe/sessions", params={"tenant": "alice"}).json()["data"]
            assert anonymous.get("/dashboard").status_code == 200  # the page holds no data
            time.sleep(0.05)
            samples = scrape(admin)
    assert [s["id"] for s in everyone] == [app.session_id] and only_bob == []
    assert [s["tenant"] for s in only_alice] == ["alice"]
    assert total(samples, "parrot_calls_total", tenant="alice", objective="throughput", outcome="done") == 3
    assert total(samples, "parrot_requests_total", tenant="bob", endpoint="completions") == 1
    assert total(samples, "parrot_generation_tokens_total", tenant="bob") == 2
    assert total(samples, "parrot_sessions_created_total", tenant="alice") == 1


def _call(call_id: str, started: float | None, finished: float | None) -> Call:
    call = Call(call_id, None, "llm", [], [], [], created=0.0, started=started, finished=finished)
    call.state = "done" if finished is not None else "running" if started is not None else "pending"
    return call


def _wire(producer: Call, consumer: Call) -> None:
    from parrot.service.runtime.graph import Variable

    var = Variable(f"{producer.id}>{consumer.id}", producer=producer, consumers=[consumer])
    producer.outputs.append(var)
    consumer.inputs.append(var)


def test_critical_path_follows_what_each_call_waited_for():
    a, b, side, c = _call("a", 0, 1), _call("b", 1, 3), _call("side", 0, 2), _call("c", 3, 4)
    _wire(a, b)
    _wire(b, c)
    _wire(side, c)  # ended before b: c did not wait on it
    assert critical_path([a, b, side, c]) == ["a", "b", "c"]
    # Still running: the path runs on through the longest chain not started yet.
    x, y = _call("x", 0, 1), _call("y", 1, None)
    z1, z2, z3 = (_call(n, None, None) for n in ("z1", "z2", "z3"))
    _wire(x, y)
    _wire(y, z1)
    _wire(y, z2)
    _wire(z2, z3)
    assert critical_path([x, y, z1, z2, z3], now=5) == ["x", "y", "z2", "z3"]
    # Nothing ran: the longest chain of dependencies.
    p, q, r = (_call(n, None, None) for n in "pqr")
    _wire(p, q)
    assert critical_path([r, p, q]) == ["p", "q"]


def test_vllm_metric_names_have_parrot_twins(live_server):
    """The vLLM metrics a dashboard reads, by the name it has here."""
    twins = {
        "vllm:time_to_first_token_seconds": "parrot_time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds": "parrot_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds": "parrot_e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds": "parrot_request_queue_time_seconds",
        "vllm:num_requests_running": "parrot_num_requests_running",
        "vllm:num_requests_waiting": "parrot_num_requests_waiting",
        "vllm:prompt_tokens_total": "parrot_prompt_tokens_total",
        "vllm:generation_tokens_total": "parrot_generation_tokens_total",
        "vllm:num_preemptions_total": "parrot_num_preemptions_total",
        "vllm:prefix_cache_queries_total": "parrot_prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total": "parrot_prefix_cache_hits_total",
        "vllm:kv_cache_usage_perc": "parrot_kv_cache_usage_perc",
    }
    with live_server.http() as http:
        http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3}).raise_for_status()
        names = {s.name for s in scrape(http)}
    names |= {n.removesuffix("_count") for n in names}
    missing = [ours for ours in twins.values() if ours not in names]
    assert not missing


def test_grafana_dashboard_reads_only_metrics_the_service_exposes(live_server):
    dashboard = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"\bparrot_\w+", e)}
    with live_server.http() as http:
        submit_map_reduce(http, num_maps=2, max_tokens=2)
        http.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2}).raise_for_status()
        time.sleep(0.05)
        exposed = {s.name for s in scrape(http)}
    exposed |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in exposed}
    assert len(exprs) > 15 and used and not used - exposed
