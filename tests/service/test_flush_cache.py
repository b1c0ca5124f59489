"""``POST /flush_cache`` (and vLLM's name, ``/reset_prefix_cache``): the next request finds nothing
cached, the engine's step counters go on, and only an operator may flush."""

from __future__ import annotations

import httpx

from parrot.service.app import create_app
from parrot.service.tenancy import TenantConfig, Tenants

PROMPT = {"prompt": "The quick brown fox jumps over the lazy dog. " * 3, "max_tokens": 2, "temperature": 0}


def cached(http: httpx.Client) -> int:
    resp = http.post("/v1/completions", json=PROMPT)
    resp.raise_for_status()
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_flush_cache_makes_the_next_request_compute_its_prompt_again(live_server, metric):
    with live_server.http() as http:
        cached(http)
        assert cached(http) > 0
        for route in ("/flush_cache", "/reset_prefix_cache"):
            resp = http.post(route)
            assert resp.status_code == 200 and resp.json() == {"flushed": {"engine-0": True}}
            assert live_server.engine.cache.total_size == 0
            assert cached(http) == 0
        page = http.get("/metrics").text
    assert metric(page, "parrot_engine_steps_total", engine="engine-0") == live_server.engine.num_steps
    busy = metric(page, "parrot_engine_busy_seconds_total", engine="engine-0")
    assert 0 < busy == live_server.engine.busy_s


def test_only_an_operator_may_flush(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    tenants = Tenants({"alice": TenantConfig(keys=["sk-alice"])}, admin_keys=["sk-admin"])
    app = create_app(engine, tenants=tenants)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/flush_cache").status_code == 401
        denied = http.post("/flush_cache", headers={"Authorization": "Bearer sk-alice"})
        assert denied.status_code == 403 and "operator" in denied.json()["error"]["message"]
        ok = http.post("/flush_cache", headers={"Authorization": "Bearer sk-admin"})
        assert ok.status_code == 200 and ok.json() == {"flushed": {"engine-0": True}}
