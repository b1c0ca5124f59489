"""Operational endpoints: /healthz, /metrics, /v1/engines."""

from __future__ import annotations

from prometheus_client import REGISTRY


def test_healthz(live_server):
    with live_server.http() as http:
        resp = http.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {
        "status": "ok", "draining": False, "engines": {"total": 1, "up": 1, "down": 0}}


def test_openapi_schema_renders(live_server):
    with live_server.http() as http:
        schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_engines_report_name_and_load(live_server):
    with live_server.http() as http:
        [engine] = http.get("/v1/engines").json()["data"]
    assert engine["kind"] == "builtin" and engine["model"] == live_server.model
    assert engine["max_context_len"] == live_server.engine.max_context_len
    load = engine["load"]
    assert load["num_running"] == 0 and load["num_waiting"] == 0
    assert 0 <= load["kv_tokens_used"] <= load["kv_tokens_total"]


def test_metrics_count_requests_and_tokens(live_server, metric):
    client = live_server.client()
    client.completions.create(model=live_server.model, prompt=["a b", "c d"], max_tokens=3,
                              temperature=0, extra_body={"ignore_eos": True})
    client.chat.completions.create(model=live_server.model, max_tokens=2, temperature=0,
                                   messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"ignore_eos": True})
    with live_server.http() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})  # a 400
        resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric(text, "parrot_requests_total", endpoint="completions",
                  finish_reason="length") == 2
    assert metric(text, "parrot_requests_total", endpoint="chat.completions",
                  finish_reason="length") == 1
    assert metric(text, "parrot_generation_tokens_total") == 3 + 3 + 2
    assert metric(text, "parrot_http_requests_total", method="POST", route="/v1/completions",
                  status="400") == 1
    assert metric(text, "parrot_http_requests_total", method="POST", route="/v1/completions",
                  status="200") == 1
    [engine_id] = [e["id"] for e in live_server.http().get("/v1/engines").json()["data"]]
    assert metric(text, "parrot_num_requests_running", engine=engine_id) == 0
    assert metric(text, "parrot_kv_tokens_total", engine=engine_id) == (
        live_server.engine.load().kv_tokens_total
    )


def test_each_app_has_its_own_registry(live_server_factory, metric):
    first, second = live_server_factory(), live_server_factory()
    first.client().completions.create(model=first.model, prompt="x y", max_tokens=2,
                                      extra_body={"ignore_eos": True})
    with first.http() as a, second.http() as b:
        assert metric(a.get("/metrics").text, "parrot_requests_total", endpoint="completions",
                      finish_reason="length") == 1
        assert "parrot_requests_total{" not in b.get("/metrics").text
    assert not any(name.startswith("parrot_") for name in REGISTRY._names_to_collectors)
