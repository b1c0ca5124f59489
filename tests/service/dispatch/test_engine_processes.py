"""Engines behind one service: registration over HTTP, heartbeats, expiry, placement of a live
graph across engines, and re-running the work of an engine that dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
import torch

from parrot.service.app import create_app
from parrot.service.engine.remote.worker import create_worker_app
from tests.service.runtime.test_native_api import Native, inp, out, text


def wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def engines(http: httpx.Client) -> list[dict]:
    return http.get("/v1/engines").json()["data"]


@pytest.fixture
def cluster(tiny_engine_factory, serve_app):
    """``cluster(local=0, expiry=5.0)`` -> service URL; ``cluster.worker(url)`` -> worker URL."""
    with ExitStack() as stack:

        class Cluster:
            def service(self, local: int = 0, expiry: float = 5.0, wait: float = 30.0) -> str:
                local_engines = [tiny_engine_factory()[0] for _ in range(local)]
                return stack.enter_context(serve_app(create_app(local_engines, engine_expiry_s=expiry,
                                                                engine_wait_s=wait)))

            def worker(self, service_url: str | None, **config) -> str:
                engine = tiny_engine_factory(**config)[0]

                def make(url):
                    return create_worker_app(engine, service_url=service_url, advertise_url=url)

                return stack.enter_context(serve_app(make))

            def enter(self, cm):
                return stack.enter_context(cm)

        yield Cluster()


def test_flush_cache_reaches_engine_processes_and_load_counts_steps(cluster):
    service = cluster.service()
    worker_url = cluster.worker(service)
    body = {"prompt": "Once upon a time there was a parrot", "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=service, timeout=30) as http, httpx.Client(base_url=worker_url) as worker:
        [engine] = wait_until(lambda: engines(http), what="registration")
        http.post("/v1/completions", json=body).raise_for_status()
        load = worker.get("/load").json()
        assert load["cached_tokens"] > 0 and load["num_steps"] >= 2 and load["busy_s"] > 0
        assert http.post("/flush_cache").json() == {"flushed": {engine["id"]: True}}
        assert worker.get("/load").json()["cached_tokens"] == 0
        again = http.post("/v1/completions", json=body).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert http.post("/reset_prefix_cache").json() == {"flushed": {engine["id"]: True}}


def test_an_engine_process_registers_serves_and_leaves(cluster):
    service = cluster.service()
    with httpx.Client(base_url=service, timeout=30) as http:
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 503
        worker_url = cluster.worker(service)
        [engine] = wait_until(lambda: engines(http), what="registration")
        assert engine["kind"] == "remote" and engine["url"] == worker_url and engine["model"] == "tiny-llama"
        wait_until(lambda: engines(http)[0]["load"]["kv_tokens_total"] > 0, what="a heartbeat")
        r = http.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        # The same through the engine's tokenizer, fetched over HTTP: a bad id is a clean 400.
        r = http.post("/v1/completions", json={"prompt": [10**7], "max_tokens": 2})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
        # The service forgets the engine: its next heartbeat gets a 404 and it registers again.
        assert http.delete(f"/v1/engines/{engine['id']}").status_code == 200
        again = wait_until(lambda: engines(http), what="re-registration")
        assert again[0]["id"] != engine["id"] and again[0]["url"] == worker_url


def test_an_engine_that_stops_heartbeating_expires(cluster):
    service = cluster.service(expiry=0.5)
    worker = cluster.worker(None)  # serves, but never heartbeats
    with httpx.Client(base_url=service, timeout=30) as http:
        r = http.post("/v1/engines", json={"url": worker, "model": "tiny-llama", "max_context_len": 2048})
        assert r.status_code == 200, r.text
        assert [e["id"] for e in engines(http)] == [r.json()["id"]]
        wait_until(lambda: not engines(http), timeout=10, what="expiry")
        assert http.post(f"/v1/engines/{r.json()['id']}/heartbeat", json={}).status_code == 404


def test_bad_registrations_are_rejected_with_a_reason(cluster):
    service = cluster.service()
    worker = cluster.worker(None)
    with httpx.Client(base_url=service, timeout=30) as http:
        r = http.post("/v1/engines", json={"url": "http://127.0.0.1:9", "model": "m", "max_context_len": 8})
        assert r.status_code == 400 and "did not answer as a Parrot engine" in r.json()["error"]["message"]
        r = http.post("/v1/engines", json={"url": worker, "model": "other", "max_context_len": 8})
        assert r.status_code == 400 and "does not serve the model 'other'" in r.json()["error"]["message"]
        r = http.post("/v1/engines", json={"url": worker})
        assert r.status_code == 400 and "model" in r.json()["error"]["message"]
        assert http.delete("/v1/engines/nope").status_code == 404
        assert engines(http) == []


def test_a_task_group_runs_on_one_engine_and_latency_work_avoids_it(cluster):
    service = cluster.service(local=2)
    with httpx.Client(base_url=service, timeout=60) as http:
        native = Native(http)
        maps = [{"id": f"map{i}", "segments": [text(f"Part {i}:"), out(f"s{i}", 48)]} for i in range(4)]
        reduce = {"id": "reduce", "segments": [inp(f"s{i}") for i in range(4)] + [text("All:"), out("r", 4)]}
        native.submit(variables=[{"id": f"s{i}"} for i in range(4)] + [{"id": "r"}], calls=[*maps, reduce])
        # A latency call while the group runs goes to the other engine.
        chat = Native(http)
        chat.submit(variables=[{"id": "a"}], calls=[{"id": "chat", "segments": [text("Hi"), out("a", 4)]}])
        chat.get("a", criterion="latency")
        assert native.get("r", criterion="throughput")["ready"]
        placed = {c["id"]: c["engine"] for c in native.graph()["calls"]}
        assert len({placed[f"map{i}"] for i in range(4)}) == 1
        assert chat.call("chat")["engine"] != placed["map0"]
        assert {e["id"] for e in engines(http)} == {placed["map0"], chat.call("chat")["engine"]}


def test_a_pending_calls_prefix_is_pinned_until_it_runs(cluster, tiny_engine_factory, serve_app):
    engine = tiny_engine_factory(kv_cache_gib=1e-6)[0]  # the smallest pool: 256 slots
    service = cluster.enter(serve_app(create_app(engine)))
    shared = "The shared instructions: summarise the text below in one line, plainly. " * 3
    prefix = engine.tokenizer.prompt_prefix_ids + engine.tokenizer.encode(shared)
    assert len(prefix) >= 32
    with httpx.Client(base_url=service, timeout=60) as http:
        native = Native(http)
        native.submit(
            variables=[{"id": "x"}, {"id": "a"}, {"id": "b"}],
            calls=[{"id": "first", "segments": [text(shared), text("one"), out("a", 4)]},
                   {"id": "later", "segments": [text(shared), inp("x"), out("b", 4)]}],
        )
        assert native.get("a")["ready"]
        # Other traffic fills the pool several times over; the pinned prefix survives.
        for i in range(6):
            r = http.post("/v1/completions", json={"prompt": [300 + i] * 200, "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert len(engine.cache.match_prefix(prefix)[0]) == len(prefix)
        http.post(f"/v1/sessions/{native.sid}/variables/x", json={"value": " two"})
        assert native.get("b")["ready"]
        assert native.call("later")["cached_tokens"] >= len(prefix)
        # Once nothing waits for it, the prefix can be evicted like any other.
        for i in range(6):
            http.post("/v1/completions", json={"prompt": [400 + i] * 200, "max_tokens": 2})
        assert len(engine.cache.match_prefix(prefix)[0]) < len(prefix)


def test_the_work_of_a_dead_engine_is_resumed_elsewhere_and_nothing_is_lost(
    cluster, tiny_engine_factory, tokenizer, tmp_path
):
    engine, hf = tiny_engine_factory()
    folder = tmp_path / "tiny-llama"
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    service = cluster.service(wait=60)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    doomed = subprocess.Popen(
        [sys.executable, "-m", "parrot.service", "engine", "--service", service, "--model", str(folder),
         "--device", "cpu", "--kv-cache-gib", "0.05", "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=service, timeout=60) as http:
            wait_until(lambda: engines(http), timeout=120, what="the engine process")
            native = Native(http)
            n = 400
            native.submit(variables=[{"id": "v"}],
                          calls=[{"id": "long", "segments": [text("Go:"), out("v", n)]}])
            # Kill the engine process mid-generation, then start another engine.
            with http.stream("GET", f"/v1/sessions/{native.sid}/variables/v/stream") as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: ") and "delta" in line:
                        break
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait(timeout=30)
            cluster.worker(service)
            value = native.get("v", timeout=120)
            assert value["ready"], value
            prompt = engine.tokenizer.prompt_prefix_ids + engine.tokenizer.encode("Go:")
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False)[0, len(prompt):].tolist()
            assert value["value"] == engine.tokenizer.decode(expected)
            [survivor] = engines(http)
            assert native.call("long")["engine"] == survivor["id"]
    finally:
        doomed.kill()
        doomed.wait(timeout=30)
