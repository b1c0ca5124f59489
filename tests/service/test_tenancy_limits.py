"""Tenant limits: each one hit is a 429 with Retry-After naming it, and other tenants go on."""

from __future__ import annotations

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.tenancy import Tenant, TenantConfig, Tenants

LIMITS = {
    "sessions": TenantConfig(keys=["k-sessions"], max_sessions=2),
    "queue": TenantConfig(keys=["k-queue"], max_queued_calls=2),
    "size": TenantConfig(keys=["k-size"], max_tokens=8, max_prompt_tokens=30),
    "rate": TenantConfig(keys=["k-rate"], tokens_per_minute=40),
    "bob": TenantConfig(keys=["k-bob"]),  # unlimited
}


def text(t):
    return {"type": "text", "text": t}


def inp(var):
    return {"type": "input", "var": var}


def out(var, max_tokens=4):
    return {"type": "output", "var": var, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}


@pytest.fixture
def served(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    tenants = Tenants(LIMITS)
    with serve_app(create_app(engine, tenants=tenants)) as url:
        clients = {name: httpx.Client(base_url=url, timeout=30, headers={"x-api-key": cfg.keys[0]})
                   for name, cfg in LIMITS.items()}
        yield clients, tenants
        for client in clients.values():
            client.close()


def assert_limited(r: httpx.Response, limit: str) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error" and error["message"].startswith(f"{limit}:"), error


def bob_is_served(clients) -> None:
    bob = clients["bob"]
    sid = bob.post("/v1/sessions", json={}).json()["id"]
    r = bob.post("/v1/graphs", json={"session_id": sid, "variables": [{"id": "a"}],
                                     "calls": [{"id": "c", "segments": [text("Hello"), out("a", 20)]}]})
    assert r.status_code == 200, r.text
    assert bob.get(f"/v1/sessions/{sid}/variables/a", params={"timeout": 30}).json()["ready"]
    r = bob.post("/v1/completions", json={"prompt": "Hello " * 40, "max_tokens": 20, "ignore_eos": True})
    assert r.status_code == 200, r.text


def session(client: httpx.Client) -> str:
    r = client.post("/v1/sessions", json={})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def graph(client: httpx.Client, sid: str, variables=(), calls=()) -> httpx.Response:
    return client.post("/v1/graphs", json={"session_id": sid, "variables": list(variables),
                                           "calls": list(calls)})


def test_max_sessions(served):
    clients, _ = served
    first = session(clients["sessions"])
    session(clients["sessions"])
    assert_limited(clients["sessions"].post("/v1/sessions", json={}), "max_sessions")
    bob_is_served(clients)
    assert clients["sessions"].delete(f"/v1/sessions/{first}").status_code == 200
    session(clients["sessions"])  # a slot again


def test_max_queued_calls_counts_native_calls_until_they_end_and_openai_requests(served):
    clients, tenants = served
    queue = clients["queue"]
    sid = session(queue)
    waiting = [{"id": f"c{i}", "segments": [inp("x"), out(f"y{i}")]} for i in range(2)]
    assert graph(queue, sid, [{"id": "x"}, {"id": "y0"}, {"id": "y1"}], waiting).status_code == 200
    assert_limited(queue.post(f"/v1/sessions/{sid}/calls", json={"id": "c2", "segments": [
        text("Hi"), out("y2")]}), "max_queued_calls")
    other = session(queue)  # the count is the tenant's, across its sessions
    assert_limited(graph(queue, other, [{"id": "z"}], [{"id": "c", "segments": [text("Hi"), out("z")]}]),
                   "max_queued_calls")
    assert_limited(queue.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), "max_queued_calls")
    assert_limited(queue.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}), "max_queued_calls")
    bob_is_served(clients)
    # The calls run and end: their slots come back.
    assert queue.post(f"/v1/sessions/{sid}/variables/x", json={"value": "Go"}).status_code == 200
    for var in ("y0", "y1"):
        assert queue.get(f"/v1/sessions/{sid}/variables/{var}", params={"timeout": 30}).json()["ready"]
    r = queue.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert tenants.by_name["queue"].active_calls() == 0  # the OpenAI request released its slot
    assert graph(queue, other, [{"id": "z"}], [{"id": "c", "segments": [text("Hi"), out("z")]}]
                 ).status_code == 200
    # A deleted session's pending calls are cancelled and released too.
    assert graph(queue, sid, [{"id": "u"}, {"id": "v"}], [{"id": "p", "segments": [inp("u"), out("v")]}]
                 ).status_code == 200
    assert queue.delete(f"/v1/sessions/{sid}").status_code == 200
    assert queue.get(f"/v1/sessions/{other}/variables/z", params={"timeout": 30}).json()["ready"]
    assert tenants.by_name["queue"].active_calls() == 0


def test_max_tokens_and_max_prompt_tokens(served):
    clients, _ = served
    size = clients["size"]
    sid = session(size)
    r = graph(size, sid, [{"id": "a"}], [{"id": "c", "segments": [text("Hi"), out("a", 9)]}])
    assert_limited(r, "max_tokens")
    r = graph(size, sid, [{"id": "a"}], [{"id": "c", "segments": [text("Hi"), out("a", 5), out("b", 5)]}])
    assert_limited(r, "max_tokens")  # the call's outputs together
    r = graph(size, sid, [{"id": "a"}], [{"id": "c", "segments": [text("word " * 40), out("a")]}])
    assert_limited(r, "max_prompt_tokens")  # static text: refused at submission
    # An input set later makes the prompt too long: the call fails with the cause.
    r = graph(size, sid, [{"id": "x"}, {"id": "a"}],
              [{"id": "c", "segments": [text("Q:"), inp("x"), out("a")]}])
    assert r.status_code == 200, r.text
    assert size.post(f"/v1/sessions/{sid}/variables/x", json={"value": "word " * 40}).status_code == 200
    r = size.get(f"/v1/sessions/{sid}/variables/a", params={"timeout": 30})
    assert r.status_code == 424 and "max_prompt_tokens" in r.json()["error"]["message"], r.text
    # Within the limits it runs.
    r = graph(size, sid, [{"id": "ok"}], [{"id": "d", "segments": [text("Hi"), out("ok", 8)]}])
    assert r.status_code == 200, r.text
    assert size.get(f"/v1/sessions/{sid}/variables/ok", params={"timeout": 30}).json()["ready"]
    # The OpenAI routes: checked before dispatch; an unset max_tokens is capped at the limit.
    assert_limited(size.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9}), "max_tokens")
    assert_limited(size.post("/v1/completions", json={"prompt": "word " * 40, "max_tokens": 2}),
                   "max_prompt_tokens")
    assert_limited(size.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "word " * 40}], "max_tokens": 2}), "max_prompt_tokens")
    r = size.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    bob_is_served(clients)


def test_tokens_per_minute_counts_native_and_openai_work(served):
    clients, tenants = served
    rate = clients["rate"]
    r = rate.post("/v1/completions", json={"prompt": "hi", "max_tokens": 30, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert tenants.by_name["rate"].tokens_last_minute() == r.json()["usage"]["total_tokens"]
    sid = session(rate)  # still under 40
    r = graph(rate, sid, [{"id": "a"}], [{"id": "c", "segments": [text("Hi"), out("a", 20)]}])
    assert r.status_code == 200, r.text
    assert rate.get(f"/v1/sessions/{sid}/variables/a", params={"timeout": 30}).json()["ready"]
    assert tenants.by_name["rate"].tokens_last_minute() >= 40
    for response in (rate.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}),
                     rate.post("/v1/sessions", json={}),
                     graph(rate, sid, [{"id": "b"}], [{"id": "d", "segments": [text("Hi"), out("b")]}])):
        assert_limited(response, "tokens_per_minute")
        assert int(response.headers["Retry-After"]) <= 60
    bob_is_served(clients)


def test_the_rolling_window_forgets_after_a_minute(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("parrot.service.tenancy.time.monotonic", lambda: now[0])
    tenant = Tenant("t", TenantConfig(tokens_per_minute=100))
    tenant.charge(60)
    now[0] += 30
    tenant.charge(50)
    with pytest.raises(Exception, match="tokens_per_minute") as err:
        tenant.check_rate()
    assert 29 <= err.value.retry_after_s <= 31  # when the first charge leaves the window
    now[0] += 31
    tenant.check_rate()  # 50 left in the window
    assert tenant.tokens_last_minute() == 50
