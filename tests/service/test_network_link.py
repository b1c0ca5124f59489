"""The benchmarks' emulated network (``benchmarks.network``): every request through it takes a
round trip more, and what goes through arrives unchanged, streams included."""

from __future__ import annotations

import time

import httpx
import pytest

from benchmarks.network import DelayedLink

RTT_S = 0.2


def test_each_request_costs_one_round_trip_and_arrives_unchanged(live_server):
    body = {"model": live_server.model, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    direct = httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=30).json()
    with DelayedLink(live_server.base_url, RTT_S) as url, httpx.Client(base_url=url, timeout=30) as http:
        http.get("/healthz").raise_for_status()  # the connection, kept for what follows
        started = time.perf_counter()
        assert http.get("/healthz").json()["status"] == "ok"
        took = time.perf_counter() - started
        assert RTT_S <= took < RTT_S + 0.5
        relayed = http.post("/v1/completions", json=body).json()
        assert relayed["choices"][0]["text"] == direct["choices"][0]["text"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            chunks = [line for line in resp.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 6


def test_a_bad_link_is_refused():
    with pytest.raises(ValueError, match="negative"):
        DelayedLink("http://127.0.0.1:8000", -1)
    with pytest.raises(ValueError, match="host and a port"):
        DelayedLink("http://localhost", 0.1)
