"""Probe cases against a live service: each request here once broke or starved it; each must
now be refused or served alone, with the rest of the service unharmed."""

from __future__ import annotations

import gc
import json
import os
import socket
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from parrot import limits
from parrot.limits import MAX_BODY_BYTES
from parrot.service.app import create_app

BIG_SEED = 2**64  # one past what a 64-bit seed holds
SECRET = "loopback-only-s3cr3t"


@pytest.fixture
def served(tiny_engine_factory, serve_app):
    engine = tiny_engine_factory()[0]
    with serve_app(create_app(engine)) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield engine, http


def _completion(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})


def test_rejected_requests_leave_no_load_behind(served):
    engine, http = served
    for _ in range(25):
        r = _completion(http, prompt=[10**7])
        assert r.status_code == 400, r.text
        r = _completion(http, prompt=[[5, 6], [10**7]], stream=True)  # one good prompt, one bad
        assert r.status_code == 400, r.text
        r = _completion(http, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense-type"}}})
        assert r.status_code == 400, r.text
    [info] = http.get("/v1/engines").json()["data"]
    assert info["in_flight"] == {"latency": 0, "throughput": 0}
    # A good prompt placed beside a bad one is aborted; the engine thread applies that on its
    # next turn, so its own count may lag the service's by a moment.
    deadline = time.monotonic() + 10
    while engine.load().num_latency and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load().num_latency == 0


def test_rejected_native_calls_leave_no_load_behind(served):
    engine, http = served
    sid = http.post("/v1/sessions", json={}).json()["id"]
    bad = {"type": "output", "var": "o", "sampling": {"max_tokens": 2,
                                                      "json_schema": {"type": "nonsense-type"}}}
    for i in range(10):
        r = http.post(f"/v1/sessions/{sid}/calls", json={"id": f"c{i}", "segments": [
            {"type": "text", "text": "hi"}, {**bad, "var": f"o{i}"}]})
        assert r.status_code == 200, r.text
        r = http.get(f"/v1/sessions/{sid}/variables/o{i}", params={"timeout": 10})
        assert r.status_code == 424, r.text
    [info] = http.get("/v1/engines").json()["data"]
    assert info["in_flight"] == {"latency": 0, "throughput": 0}
    assert engine.load().num_latency == 0


def _chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})


def test_seeds_take_64_bits_and_wider_ones_are_a_400_naming_them(served):
    engine, http = served
    for send in (_completion, _chat):
        r = send(http, seed=BIG_SEED, temperature=1)
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
        for seed in (2**64 - 1, -1):
            assert send(http, seed=seed, temperature=1).status_code == 200
    sid = http.post("/v1/sessions", json={}).json()["id"]
    r = http.post(f"/v1/sessions/{sid}/calls", json={"id": "c", "segments": [
        {"type": "text", "text": "hi"},
        {"type": "output", "var": "o", "sampling": {"max_tokens": 2, "temperature": 1, "seed": BIG_SEED}}]})
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    # Nothing reached the engine, which still serves.
    assert _completion(http, temperature=1, seed=3).status_code == 200
    assert engine._thread is not None and engine._thread.is_alive()


def test_a_tiny_temperature_samples_greedily_beside_other_chats(served):
    _, http = served

    def chat(temperature: float) -> httpx.Response:
        return _chat(http, temperature=temperature, max_tokens=8, ignore_eos=True)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(chat, [1.0, 1e-300, 0.8, 1.0]))
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert answers[1].json()["choices"][0]["message"]["content"] == chat(0).json()[
        "choices"][0]["message"]["content"]
    r = _chat(http, temperature=1.0, top_p=1e-300, max_tokens=4)  # 0 in float32: the top token
    assert r.status_code == 200, r.text
    for bad in ('{"temperature": 1e400}', '{"top_p": NaN}'):  # inf/NaN never reach the sampler
        body = bad[:-1] + ', "prompt": "hi", "max_tokens": 2}'
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_body_over_the_cap_is_a_413_before_it_is_read(tiny_engine_factory, serve_app):
    engine = tiny_engine_factory()[0]
    with serve_app(create_app(engine, max_body_bytes=64 * 1024)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        big = {"messages": [{"role": "user", "content": "x" * 100_000}], "max_tokens": 2}
        r = http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "65536 bytes" in error["message"]

        def chunks():  # no Content-Length: the cap applies as the body arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 10_000
            yield b'", "max_tokens": 2}'

        r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"], r.text
        r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_the_default_cap_refuses_a_20_mb_chat_message(served):
    _, http = served
    body = json.dumps({"messages": [{"role": "user", "content": "word " * (4 * 2**20)}]})  # 20 MiB
    before = _rss_bytes()
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in r.json()["error"]["message"], r.text
    assert _rss_bytes() - before < 16 * 2**20  # the service never held the body


@pytest.mark.parametrize("face", ["openai", "native"])
def test_tokenizing_a_big_input_does_not_stall_other_requests(served, face):
    _, http = served
    text = "many words in a long message. " * (3 * 2**20 // 30)  # 3 MiB: within the body cap

    def big_request() -> httpx.Response:
        if face == "openai":
            return _chat(http, messages=[{"role": "user", "content": text}])
        sid = http.post("/v1/sessions", json={}).json()["id"]
        r = http.post("/v1/graphs", json={"session_id": sid, "variables": [
            {"id": "doc", "value": text}, {"id": "o"}], "calls": [{"id": "c", "messages": [
                {"role": "user", "content": [{"type": "input", "var": "doc"}]}],
                "output": {"var": "o", "sampling": {"max_tokens": 2}}}]})
        assert r.status_code == 200, r.text
        return http.get(f"/v1/sessions/{sid}/variables/o", params={"timeout": 30})

    before = _rss_bytes()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(big_request)
        time.sleep(0.3)  # the request is being tokenized now (about a second of work)
        with httpx.Client(base_url=str(http.base_url), timeout=30) as other:
            started = time.monotonic()
            assert other.get("/v1/models").status_code == 200
            waited = time.monotonic() - started
        done_after = pending.result()
    assert waited < 1.0, f"a small request waited {waited:.2f} s behind the big one"
    # Far longer than the model's context: refused once tokenized, with the reason.
    assert done_after.status_code in (400, 424), done_after.text
    assert "context" in done_after.text
    gc.collect()
    assert _rss_bytes() - before < 400 * 2**20


def test_quotas_are_a_400_naming_the_limit_before_any_work(served):
    _, http = served

    def refused(r: httpx.Response, *words: str) -> None:
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert all(w in message for w in words), message

    refused(http.post("/v1/sessions", json={"idle_timeout_s": 1e308}), "idle_timeout_s", "86400")
    sid = http.post("/v1/sessions", json={"idle_timeout_s": 86400}).json()["id"]
    calls = [{"id": f"c{i}", "kind": "native", "outputs": [f"v{i}"]} for i in range(1001)]
    variables = [{"id": f"v{i}"} for i in range(1001)]
    refused(http.post("/v1/graphs", json={"session_id": sid, "variables": variables, "calls": calls}),
            "calls", "1000")
    segments = [{"type": "text", "text": "a"}] * 1001 + [{"type": "output", "var": "o"}]
    refused(http.post(f"/v1/sessions/{sid}/calls", json={"id": "c", "segments": segments}),
            "segments", "1000")
    refused(http.post(f"/v1/sessions/{sid}/variables", json={"id": "big", "value": "x" * (4 * 2**20 + 1)}),
            "value", str(4 * 2**20))
    refused(_completion(http, prompt=["p"] * 257), "256 prompts")
    refused(_completion(http, n=129), "n", "128")
    refused(_completion(http, logit_bias={str(i): 1 for i in range(1025)}), "logit_bias", "1024")
    refused(_completion(http, stop=[f"s{i}" for i in range(17)]), "16 stop strings")
    # Nothing was added: the session's graph is still empty.
    assert http.get(f"/v1/sessions/{sid}/graph").json()["calls"] == []


def test_a_deleted_sessions_graph_is_released(tiny_engine_factory, serve_app):
    engine = tiny_engine_factory()[0]
    app = create_app(engine)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        # A big graph: most calls wait on an input that never comes, a few run.
        variables = [{"id": "x"}] + [{"id": f"o{i}"} for i in range(1000)]
        shared = [{"type": "text", "text": "Shared instructions, long enough to be pinned. " * 8}]
        calls = [{"id": f"c{i}", "segments": [*shared, {"type": "input", "var": "x"} if i >= 4 else
                                             {"type": "text", "text": str(i)},
                                             {"type": "output", "var": f"o{i}",
                                              "sampling": {"max_tokens": 64, "ignore_eos": True}}]}
                 for i in range(1000)]
        r = http.post("/v1/graphs", json={"session_id": sid, "variables": variables, "calls": calls})
        assert r.status_code == 200, r.text
        graph = weakref.ref(app.state.sessions.sessions[sid].graph)
        assert http.delete(f"/v1/sessions/{sid}").status_code == 200
        deadline = time.monotonic() + 10
        while graph() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        assert graph() is None, gc.get_referrers(graph())
        [info] = http.get("/v1/engines").json()["data"]
        assert info["in_flight"] == {"latency": 0, "throughput": 0}
        executor = app.state.sessions.executor
        assert not executor.pins.pending and not executor.pins.pins and not executor._dispatches


def _secret_app() -> FastAPI:
    """A loopback-only service with something to hide, at every path."""
    app = FastAPI()

    @app.get("/info")
    async def info() -> dict:
        return {"model": "tiny-llama", "secret": SECRET}  # JSON, but not an engine's /info

    @app.get("/admin/info")
    async def admin() -> PlainTextResponse:
        return PlainTextResponse(f"forbidden: {SECRET}", status_code=403)

    return app


def test_registration_never_echoes_another_url_nor_tells_ports_apart(served, serve_app):
    _, http = served
    with serve_app(_secret_app()) as secret_url, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        answers = []
        for url in (secret_url, f"{secret_url}/admin", closed_url, "file:///etc/passwd"):
            r = http.post("/v1/engines", json={"url": url, "model": "tiny-llama", "max_context_len": 8})
            assert r.status_code == 400, r.text
            assert SECRET not in r.text
            answers.append(r.json()["error"]["message"])
        assert set(answers) == {"the URL did not answer as a Parrot engine"}
    assert [e["kind"] for e in http.get("/v1/engines").json()["data"]] == ["builtin"]


def test_no_client_code_runs_on_the_server(served, tmp_path):
    _, http = served
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    sid = http.post("/v1/sessions", json={}).json()["id"]
    # A native call has no field that could carry code: one is an unsupported parameter.
    for field in ("code", "function", "source"):
        r = http.post(f"/v1/sessions/{sid}/calls", json={
            "id": "f", "kind": "native", "inputs": [], "outputs": ["y"], field: code})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    # Code as data (a name, values, template text) stays data: the server only waits for the
    # client to set a native call's outputs.
    r = http.post("/v1/graphs", json={"session_id": sid, "variables": [
        {"id": "x", "value": code}, {"id": "y"}, {"id": "z"}], "calls": [
        {"id": "f", "name": code, "kind": "native", "inputs": ["x"], "outputs": ["y"]},
        {"id": "g", "segments": [{"type": "text", "text": code}, {"type": "input", "var": "y"},
                                 {"type": "output", "var": "z", "sampling": {"max_tokens": 2}}]}]})
    assert r.status_code == 200, r.text
    r = http.get(f"/v1/sessions/{sid}/variables/y", params={"timeout": 0.5})
    assert r.status_code == 200 and r.json()["ready"] is False
    assert http.get(f"/v1/sessions/{sid}/calls/f").json()["state"] == "running"  # in the client
    http.post(f"/v1/sessions/{sid}/variables/y", json={"value": code})
    assert http.get(f"/v1/sessions/{sid}/variables/z", params={"timeout": 30}).json()["ready"]
    assert not marker.exists()


def test_submissions_add_up_to_a_session_limit(served, monkeypatch):
    _, http = served
    monkeypatch.setattr(limits, "MAX_CALLS_PER_SESSION", 3)
    sid = http.post("/v1/sessions", json={}).json()["id"]

    def submit(first: int, count: int) -> httpx.Response:
        ids = range(first, first + count)
        return http.post("/v1/graphs", json={
            "session_id": sid, "variables": [{"id": f"v{i}"} for i in ids],
            "calls": [{"id": f"c{i}", "kind": "native", "outputs": [f"v{i}"]} for i in ids]})

    assert submit(0, 2).status_code == 200
    r = submit(2, 2)
    assert r.status_code == 400 and "at most 3 calls" in r.json()["error"]["message"], r.text
    assert submit(2, 1).status_code == 200
