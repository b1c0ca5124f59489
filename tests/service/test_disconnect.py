"""A client that goes away mid-request gets its engine request aborted (and its KV freed)."""

from __future__ import annotations

import time

import httpx
import pytest

LONG = {"prompt": "Tell me everything", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def wait_until_idle(engine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.load().num_running or engine.load().num_waiting:
        assert time.monotonic() < deadline, f"still running: {engine.load()}"
        time.sleep(0.02)


def assert_stopped_early(server, metric) -> None:
    """No engine steps after the abort, and far fewer than the 2000 tokens asked for."""
    wait_until_idle(server.engine)
    steps = server.engine.num_steps
    time.sleep(0.3)
    assert server.engine.num_steps == steps
    assert steps < 1000, f"the request ran on for {steps} steps after its client left"
    with server.http() as http:
        assert metric(http.get("/metrics").text, "parrot_requests_total", endpoint="completions",
                      finish_reason="abort") == 1


def test_disconnect_mid_stream_aborts_the_request(live_server, metric):
    with httpx.Client(base_url=live_server.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
            assert live_server.engine.load().num_running == 1
        # Leaving the block closes the connection with the body unread.
    assert_stopped_early(live_server, metric)


def test_disconnect_during_a_non_streamed_request_aborts_it(live_server, metric):
    with httpx.Client(base_url=live_server.base_url) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    assert_stopped_early(live_server, metric)
