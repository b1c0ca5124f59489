"""Drain on SIGTERM (a real ``parrot serve`` process) and the truth of /healthz and /readyz."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.drain import (
    DRAINING_MESSAGE,
    SHUTDOWN_MESSAGE,
    SHUTDOWN_REQUEST_MESSAGE,
    produced_without_client,
)
from parrot.service.engine.openai import OpenAIEngine
from parrot.service.runtime.graph import Call, Variable
from tests.conftest import make_tiny_model
from tests.service.conftest import free_port, wait_for_http


@pytest.fixture(scope="module")
def model_folder(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("drain") / "tiny-llama"
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def wait_running(self, n: int, timeout_s: float = 20) -> None:
        """Until the engine runs or queues ``n`` requests."""
        deadline = time.monotonic() + timeout_s
        while True:
            [engine] = httpx.get(f"{self.url}/v1/engines", timeout=10).json()["data"]
            if engine["load"]["num_running"] + engine["load"]["num_waiting"] >= n:
                return
            assert time.monotonic() < deadline, f"not running: {engine['load']}"
            time.sleep(0.02)


@contextmanager
def parrot_serve(folder: Path, drain_timeout_s: float) -> Iterator[Served]:
    # One request at a time, so a few long generations keep the engine busy for seconds.
    port = free_port()
    log_path = folder.parent / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.service", "serve", "--model", str(folder), "--port", str(port),
             "--device", "cpu", "--threads", "1", "--kv-cache-gib", "0.05", "--max-running", "1",
             "--drain-timeout", str(drain_timeout_s), "--log-level", "warning"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", proc, log_path)
        yield Served(proc, url, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def llm_call(call_id: str, var: str, max_tokens: int) -> dict:
    return {"id": call_id, "segments": [
        {"type": "text", "text": "Once upon a time"},
        {"type": "output", "var": var, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}]}


def new_session(http: httpx.Client, variables: list[dict], calls: list[dict]) -> str:
    sid = http.post("/v1/sessions", json={}).json()["id"]
    r = http.post("/v1/graphs", json={"session_id": sid, "variables": variables, "calls": calls})
    assert r.status_code == 200, r.text
    return sid


def sse_events(url: str, path: str) -> tuple[list[dict], float]:
    """Every event of a native variable stream, and when the stream ended."""
    events = []
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("GET", path) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events, time.monotonic()


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    result = fn(*args, **kw)
    return result, time.monotonic()


def assert_draining_refusal(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["retry-after"]) > 0
    error = resp.json()["error"]
    assert error["code"] == "draining" and error["message"] == DRAINING_MESSAGE


def test_sigterm_drains_in_flight_work_and_exits_0(model_folder):
    # Seconds of work for the one-at-a-time engine: still running when the checks below end.
    long_completion = {"model": "tiny-llama", "prompt": ["a", "b", "c"], "max_tokens": 1800,
                       "temperature": 0, "ignore_eos": True}
    with parrot_serve(model_folder, drain_timeout_s=30) as served, served.http() as http, \
            ThreadPoolExecutor(8) as pool:
        sid = new_session(http, [{"id": "story"}, {"id": "idle"}, {"id": "idle2"}],
                          [llm_call("write", "story", 600)])
        completion: Future = pool.submit(http.post, "/v1/completions", json=long_completion)
        story: Future = pool.submit(timed, http.get, f"/v1/sessions/{sid}/variables/story",
                                    params={"timeout": 60})
        idle_poll: Future = pool.submit(timed, http.get, f"/v1/sessions/{sid}/variables/idle",
                                        params={"timeout": 60})
        idle_stream: Future = pool.submit(sse_events, served.url,
                                          f"/v1/sessions/{sid}/variables/idle2/stream")
        served.wait_running(4)
        time.sleep(0.2)  # the idle poll and stream are open by now
        assert not (idle_poll.done() or idle_stream.done())

        served.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + 10
        while http.get("/healthz").json()["status"] != "draining":
            assert time.monotonic() < deadline
            time.sleep(0.02)

        # New work is refused while the old finishes; reads and health still answer.
        assert_draining_refusal(http.post("/v1/completions", json={**long_completion, "max_tokens": 2}))
        assert_draining_refusal(http.post("/v1/sessions", json={}))
        assert_draining_refusal(http.post("/v1/graphs", json={
            "session_id": sid, "variables": [{"id": "more"}], "calls": [llm_call("more", "more", 2)]}))
        assert_draining_refusal(http.get(f"/v1/sessions/{sid}/variables/idle", params={"timeout": 30}))
        health, ready = http.get("/healthz"), http.get("/readyz")
        assert health.status_code == 200 and health.json()["status"] == "draining"
        assert ready.status_code == 503 and "the service is draining" in ready.json()["reasons"]
        assert http.get(f"/v1/sessions/{sid}/graph").status_code == 200

        # The idle long-poll and stream ended at once, not after their 60 s.
        poll, poll_ended = idle_poll.result(timeout=5)
        assert_draining_refusal(poll)
        assert poll_ended - signalled < 2
        events, stream_ended = idle_stream.result(timeout=5)
        assert events == [{"error": DRAINING_MESSAGE}] and stream_ended - signalled < 2
        assert not completion.done(), "the test needs the generation still running here"

        # The in-flight work finished and was delivered.
        resp = completion.result(timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 3 * 1800
        value, _ = story.result(timeout=30)
        assert value.status_code == 200 and value.json()["ready"], value.text
        assert served.proc.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 30
    log = served.log.read_text()
    assert "all in-flight work finished" in log and "Traceback" not in log


def test_drain_past_its_timeout_cancels_with_a_clear_error_and_exits_0(model_folder):
    with parrot_serve(model_folder, drain_timeout_s=1) as served, served.http() as http, \
            ThreadPoolExecutor(4) as pool:
        sid = new_session(http, [{"id": "story"}], [llm_call("write", "story", 1800)])
        story: Future = pool.submit(http.get, f"/v1/sessions/{sid}/variables/story",
                                    params={"timeout": 60})
        completion: Future = pool.submit(http.post, "/v1/completions", json={
            "model": "tiny-llama", "prompt": ["x", "y", "z"], "max_tokens": 1800, "temperature": 0,
            "ignore_eos": True})
        served.wait_running(2)
        served.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        value = story.result(timeout=15)
        assert value.status_code == 424, value.text
        assert value.json()["error"]["message"] == SHUTDOWN_MESSAGE
        resp = completion.result(timeout=15)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == {"message": SHUTDOWN_REQUEST_MESSAGE, "type": "server_error",
                                        "param": None, "code": "shutdown"}
        assert served.proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10  # 1 s of drain, then the cancellation's grace
    log = served.log.read_text()
    assert "cancelled 1 call(s) and 1 request(s)" in log and "Traceback" not in log


def test_a_stream_cut_by_the_drain_ends_with_an_error_event(model_folder):
    with parrot_serve(model_folder, drain_timeout_s=0.5) as served, served.http() as http:
        with http.stream("POST", "/v1/completions", json={
                "model": "tiny-llama", "prompt": ["x", "y", "z"], "max_tokens": 1900, "temperature": 0,
                "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            served.proc.send_signal(signal.SIGTERM)
            last = [line for line in lines if line.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["message"] == SHUTDOWN_REQUEST_MESSAGE
        assert served.proc.wait(timeout=15) == 0


# ---- health and readiness (in-process) ------------------------------------------------------

def get_json(url: str) -> tuple[int, dict]:
    resp = httpx.get(url, timeout=10)
    return resp.status_code, resp.json()


def wait_for(check: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_health_and_readiness_while_serving_and_draining(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    app = create_app(engine)
    with serve_app(app) as url:
        assert get_json(f"{url}/healthz") == (200, {"status": "ok", "draining": False, "engines": {
            "total": 1, "up": 1, "down": 0}})
        status, ready = get_json(f"{url}/readyz")
        assert status == 200 and ready["ready"] and ready["reasons"] == []
        app.state.drain.begin()  # what SIGTERM does first
        status, health = get_json(f"{url}/healthz")
        assert status == 200 and health["status"] == "draining"  # alive: let it finish its work
        status, ready = get_json(f"{url}/readyz")
        assert status == 503 and ready["reasons"] == ["the service is draining"]
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert_draining_refusal(refused)


def test_an_engine_marked_down_degrades_health(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    closed = free_port()
    unreachable = OpenAIEngine(f"http://127.0.0.1:{closed}/v1", tokenizer=engine.tokenizer,
                               model="tiny-llama", max_context_len=256, connect_timeout_s=1)
    with serve_app(create_app([engine, unreachable], engine_probe_interval_s=0.2)) as url:
        status, health = get_json(f"{url}/healthz")
        assert status == 200
        assert health == {"status": "degraded", "draining": False,
                          "engines": {"total": 2, "up": 1, "down": 1}}
        status, ready = get_json(f"{url}/readyz")
        assert status == 200 and ready["ready"]


def test_only_unreachable_engines_are_not_ready_but_alive(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    unreachable = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", tokenizer=engine.tokenizer,
                               model="tiny-llama", max_context_len=256, connect_timeout_s=1)
    with serve_app(create_app([unreachable], engine_probe_interval_s=0.2)) as url:
        status, health = get_json(f"{url}/healthz")
        assert status == 200 and health["status"] == "degraded"  # it may come back: no restart
        status, ready = get_json(f"{url}/readyz")
        assert status == 503 and ready["reasons"] == ["no engine is up"]


def test_a_dead_engine_thread_fails_liveness(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine)) as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert engine.alive
        engine._commands.put(("stop", None))  # the runner thread ends, as if it had crashed
        wait_for(lambda: not engine.alive)
        wait_for(lambda: get_json(f"{url}/readyz")[0] == 503)
        status, health = get_json(f"{url}/healthz")
        assert status == 503
        assert health == {"status": "failed", "draining": False,
                          "engines": {"total": 1, "up": 0, "down": 1}}
        assert get_json(f"{url}/readyz")[1]["reasons"] == [
            "no engine can serve again (an engine thread stopped)"]


def test_which_variables_a_drain_waits_for():
    def var(name: str, producer: Call | None = None, value: str | None = None) -> Variable:
        v = Variable(name, value=value)
        if value is not None:
            v.settled.set()
        v.producer = producer
        return v

    def call(kind: str, inputs: list[Variable], state: str = "pending") -> Call:
        return Call(f"c{len(inputs)}{kind}", None, kind, [], inputs, [], state=state)  # type: ignore[arg-type]

    from_client = var("x")  # set by a client, someday
    ready = var("r", value="done")
    running = var("a", call("llm", [ready], "running"))
    after_running = var("b", call("llm", [running]))  # unblocked when ``a`` is set
    after_client = var("c", call("llm", [running, from_client]))
    native = var("n", call("native", [ready], "running"))  # the client runs native calls
    assert produced_without_client(ready) and produced_without_client(running)
    assert produced_without_client(after_running)
    assert not produced_without_client(from_client)
    assert not produced_without_client(after_client)
    assert not produced_without_client(native)
