"""A bounded load test: concurrent sessions of small graphs from several client processes, plus
OpenAI-route traffic, against one ``parrot serve`` process on a tiny model (see benchmarks/load.py,
which runs the same load at full size on the default model).

Checked: every session's final value delivered exactly once and its graph the expected shape; no
session left after the clients delete theirs, no engine work left; the server's memory bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from benchmarks.load import rss_bytes, run_load, warm_up
from tests.service.conftest import parrot_serve

SESSIONS = 200
PROCESSES = 3
OPENAI_REQUESTS = 30
TOKENS = 3
# Growth allowed over the load: a leak of what 200 sessions hold (their graphs, token ids, KV
# references) would be far larger relative to one session, but allocator slack is not zero.
MAX_RSS_GROWTH = 150 << 20


@pytest.fixture(scope="module")
def served(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A ``parrot serve`` process on a tiny random-weight llama: (its URL, its pid)."""
    folder = tmp_path_factory.mktemp("load") / "tiny-llama"
    with parrot_serve(tokenizer, folder, "--kv-cache-gib", "0.1") as (url, proc):
        yield url, proc.pid


def test_concurrent_sessions_delivered_once_without_leaks(served: tuple[str, int]) -> None:
    url, pid = served
    warm_up(url, TOKENS)
    before = rss_bytes(pid)
    report = run_load(url, sessions=SESSIONS, processes=PROCESSES, openai_requests=OPENAI_REQUESTS,
                      tokens=TOKENS)
    after = rss_bytes(pid)
    print(f"\nload: {report.sessions} sessions, {report.calls} graph calls + {report.openai_requests} "
          f"OpenAI requests in {report.seconds:.1f} s ({report.calls_per_s:.1f} calls/s), session "
          f"p50 {report.percentile(0.5):.2f} s p99 {report.percentile(0.99):.2f} s, RSS "
          f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert report.problems == []
    assert report.leaked == []
    # Every session came back with its final value read once; every call and request counted.
    assert len(report.session_latencies) == SESSIONS
    assert report.calls == sum(2 + i % 2 for i in range(SESSIONS))
    assert report.openai_requests == OPENAI_REQUESTS
    assert after - before < MAX_RSS_GROWTH, f"RSS grew from {before} to {after} bytes"
    with httpx.Client(base_url=url, timeout=30) as http:  # and the service still serves
        assert http.get("/healthz").status_code == 200
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
