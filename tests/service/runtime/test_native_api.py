"""The native API against a live service on a tiny model: graphs, objectives, errors."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import torch

from parrot.service.app import create_app


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def out(var, max_tokens=8, **sampling):
    sampling = {"max_tokens": max_tokens, "ignore_eos": True, **sampling}
    return {"type": "output", "var": var, "sampling": sampling}


def text(t):
    return {"type": "text", "text": t}


def inp(var):
    return {"type": "input", "var": var}


class Native:
    """A thin test client over httpx for one session."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.sid = http.post("/v1/sessions", json={}).json()["id"]

    def submit(self, variables=(), calls=(), expect=200):
        r = self.http.post("/v1/graphs", json={"session_id": self.sid, "variables": list(variables),
                                               "calls": list(calls)})
        assert r.status_code == expect, r.text
        return r.json()

    def get(self, var, criterion="latency", expect=200, timeout=30):
        params = {"timeout": timeout} | ({"criterion": criterion} if criterion else {})
        r = self.http.get(f"/v1/sessions/{self.sid}/variables/{var}", params=params)
        assert r.status_code == expect, r.text
        return r.json()

    def graph(self):
        return self.http.get(f"/v1/sessions/{self.sid}/graph").json()

    def call(self, call_id):
        return next(c for c in self.graph()["calls"] if c["id"] == call_id)


@pytest.fixture
def server(live_server_factory):
    return live_server_factory()


@pytest.fixture
def native(server):
    with server.http() as http:
        yield Native(http)


def test_chain_runs_in_dependency_order_and_reuses_the_parents_kv(native):
    native.submit(
        variables=[{"id": "task", "value": "a snake game"}, {"id": "code"}, {"id": "review"}],
        calls=[
            {"id": "write", "segments": [text("Write python code of "), inp("task"), text(". Code: "),
                                         out("code", 12)]},
            # The reviewer's prompt starts with the writer's whole context: a radix-cache hit.
            {"id": "check", "segments": [text("Write python code of "), inp("task"), text(". Code: "),
                                         inp("code"), text(" Review: "), out("review", 6)]},
        ],
    )
    review = native.get("review")
    assert review["ready"] and review["producer"] == "check"
    write, check = native.call("write"), native.call("check")
    assert write["state"] == check["state"] == "done"
    assert check["timings"]["started"] >= write["timings"]["finished"] - 1e-3
    assert check["cached_tokens"] >= write["prompt_tokens"] + 12 - 1


def test_independent_siblings_run_at_the_same_time(native):
    calls = [{"id": f"s{i}", "segments": [text(f"Story {i}:"), out(f"v{i}", 24)]} for i in range(3)]
    native.submit(variables=[{"id": f"v{i}"} for i in range(3)], calls=calls)
    for i in range(3):
        native.get(f"v{i}")
    spans = [(c["timings"]["started"], c["timings"]["finished"]) for c in native.graph()["calls"]]
    assert max(s for s, _ in spans) < min(f for _, f in spans)  # all started before any finished


def test_latency_fetch_flows_back_with_critical_path_priorities_and_groups(native):
    # short and long feed the reducer; unrelated is not an ancestor of the fetched variable.
    native.submit(
        variables=[{"id": v} for v in ("a", "b", "r", "u")],
        calls=[
            {"id": "short", "segments": [text("A:"), out("a", 2)]},
            {"id": "long", "segments": [text("B:"), out("b", 16)]},
            {"id": "reduce", "segments": [inp("a"), inp("b"), text(" Sum:"), out("r", 4)]},
            {"id": "unrelated", "segments": [text("U:"), out("u", 2)]},
        ],
    )
    native.get("r", criterion="latency")
    calls = {c["id"]: c for c in native.graph()["calls"]}
    assert {calls[c]["criterion"] for c in ("short", "long", "reduce")} == {"latency"}
    assert calls["unrelated"]["criterion"] is None
    assert calls["long"]["priority"] == calls["reduce"]["priority"] > calls["short"]["priority"] >= 100
    assert calls["short"]["group"] == calls["long"]["group"] == "reduce"
    native.get("u", criterion="throughput")
    assert native.call("unrelated")["criterion"] == "throughput"


def test_fetches_announced_with_the_graph_set_the_objective_before_calls_run(native, server):
    def running_load():
        deadline = time.monotonic() + 10
        while (load := server.engine.load()).num_running == 0:
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.005)
        return load

    native.http.post("/v1/graphs", json={
        "session_id": native.sid, "variables": [{"id": "chat"}],
        "calls": [{"id": "answer", "segments": [text("Q: hi A:"), out("chat", 64)]}],
        "fetches": [{"var": "chat", "criterion": "latency"}]}).raise_for_status()
    assert running_load().num_latency == 1  # placed and run as latency work, before any GET
    assert native.call("answer")["criterion"] == "latency"
    native.get("chat")
    native.submit(variables=[{"id": "bulk"}], calls=[{"id": "b", "segments": [text("Q:"), out("bulk", 64)]}])
    assert running_load().num_latency == 0  # nobody announced a fetch: throughput work
    r = native.http.post("/v1/graphs", json={"session_id": native.sid, "variables": [{"id": "x"}],
                                             "fetches": [{"var": "nope", "criterion": "latency"}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert native.get("x", timeout=0.1, expect=404)  # nothing of the refused graph was added


def test_several_outputs_fill_and_generate_in_one_sequence(native, server):
    native.submit(
        variables=[{"id": "x"}, {"id": "y"}],
        calls=[{"id": "two", "segments": [text("Name:"), out("x", 5), text(" Age:"), out("y", 5)]}],
    )
    x, y = native.get("x")["value"], native.get("y")["value"]
    assert x and y
    # The same fill -> generate -> fill -> generate by hand gives the same text.
    engine = server.engine
    first = engine.tokenizer.encode("Name:")
    gen = server.hf_model.generate(
        torch.tensor([first]), max_new_tokens=5, do_sample=False, min_new_tokens=5
    )[0, len(first):].tolist()
    assert engine.tokenizer.decode(gen) == x


def test_native_call_outputs_set_by_the_client_feed_llm_calls(native):
    native.submit(
        variables=[{"id": "raw"}, {"id": "clean"}, {"id": "final"}],
        calls=[
            {"id": "gen", "segments": [text("Data:"), out("raw", 4)]},
            {"id": "py", "kind": "native", "inputs": ["raw"], "outputs": ["clean"]},
            {"id": "use", "segments": [text("Clean:"), inp("clean"), out("final", 4)]},
        ],
    )
    raw = native.get("raw", criterion=None)["value"]
    assert native.call("py")["state"] == "running"  # waiting for the client
    r = native.http.post(f"/v1/sessions/{native.sid}/variables/clean", json={"value": raw.upper()})
    assert r.status_code == 200
    assert native.get("final")["ready"]
    assert native.call("py")["state"] == "done"
    graph = native.graph()
    assert {(e["source"], e["target"]) for e in graph["edges"]} == {("gen", "py"), ("py", "use")}


def test_stream_deltas_add_up_to_the_value(native):
    native.submit(variables=[{"id": "s"}], calls=[{"id": "c", "segments": [text("Once"), out("s", 20)]}])
    deltas, final = [], None
    with native.http.stream("GET", f"/v1/sessions/{native.sid}/variables/s/stream") as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "delta" in event:
                    deltas.append(event["delta"])
                else:
                    final = event
    assert final == {"done": True, "value": "".join(deltas)}
    assert native.get("s")["value"] == final["value"]


def test_graph_errors_are_clear_4xx_and_change_nothing(native, server):
    bad = [
        # a cycle
        ({"variables": [{"id": "p"}, {"id": "q"}],
          "calls": [{"id": "c1", "segments": [inp("q"), out("p")]},
                    {"id": "c2", "segments": [inp("p"), out("q")]}]}, 400, "cycle"),
        # an unknown variable
        ({"calls": [{"id": "c3", "segments": [inp("nope"), out("nope2")]}]}, 404, "not found"),
        # two producers of one variable
        ({"variables": [{"id": "z"}], "calls": [{"id": "c4", "segments": [out("z")]},
                                                {"id": "c5", "segments": [out("z")]}]}, 409, "producer"),
        # a call producing a constant
        ({"variables": [{"id": "k", "value": "fixed"}], "calls": [{"id": "c6", "segments": [out("k")]}]},
         409, "has a value"),
        # a malformed segment
        ({"calls": [{"id": "c7", "segments": [{"type": "bogus"}]}]}, 400, "segments"),
        # no output at all
        ({"calls": [{"id": "c8", "segments": [text("hi")]}]}, 400, "no output"),
    ]
    for body, status, words in bad:
        r = native.http.post("/v1/graphs", json={"session_id": native.sid, **body})
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    graph = native.graph()
    assert graph["calls"] == [] and graph["variables"] == []
    # setting a variable an llm call produces
    native.submit(variables=[{"id": "made"}],
                  calls=[{"id": "maker", "segments": [text("x"), out("made", 2)]}])
    r = native.http.post(f"/v1/sessions/{native.sid}/variables/made", json={"value": "forged"})
    assert r.status_code == 409 and "produced by call" in r.json()["error"]["message"]
    assert native.get("made")["value"] != "forged"


def test_another_sessions_variables_are_invisible(server):
    with server.http() as http:
        a, b = Native(http), Native(http)
        a.submit(variables=[{"id": "secret", "value": "the password"}])
        assert "the password" not in json.dumps(b.get("secret", expect=404))
        r = http.post("/v1/graphs", json={"session_id": b.sid, "calls": [
            {"id": "steal", "segments": [inp("secret"), out("leak")]}]})
        assert r.status_code == 404
        assert b.graph()["calls"] == []


def test_failed_call_fails_its_dependents_with_the_cause(native):
    too_long = "word " * 3000  # beyond the tiny model's 2048-token context
    native.submit(
        variables=[{"id": "big", "value": too_long}, {"id": "a"}, {"id": "b"}],
        calls=[{"id": "first", "segments": [inp("big"), out("a", 4)]},
               {"id": "second", "segments": [inp("a"), out("b", 4)]}],
    )
    err = native.get("b", expect=424)["error"]["message"]
    assert "context length" in err and "first" in err
    calls = {c["id"]: c for c in native.graph()["calls"]}
    assert calls["first"]["state"] == calls["second"]["state"] == "failed"


def test_deleting_a_session_cancels_its_work_and_frees_the_engine(native, server):
    native.submit(variables=[{"id": "long"}],
                  calls=[{"id": "forever", "segments": [text("Go:"), out("long", 1500)]}])
    deadline = time.monotonic() + 10
    while server.engine.load().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native.http.delete(f"/v1/sessions/{native.sid}").status_code == 200
    while server.engine.load().num_running and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    assert server.engine.load().num_running == 0
    for path in ("/graph", "/variables/long"):
        r = native.http.get(f"/v1/sessions/{native.sid}{path}")
        assert r.status_code == 404
    r = native.http.post("/v1/graphs", json={"session_id": native.sid, "calls": []})
    assert r.status_code == 404


def test_idle_sessions_expire(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app(engine)) as url, httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json={"idle_timeout_s": 0.5}).json()["id"]
        assert http.get(f"/v1/sessions/{sid}/graph").status_code == 200
        time.sleep(2.0)
        assert http.get(f"/v1/sessions/{sid}/graph").status_code == 404


def test_long_poll_times_out_with_ready_false(native):
    native.submit(variables=[{"id": "later"}])  # a client-owned variable nobody set yet
    t = time.monotonic()
    info = native.get("later", criterion=None, timeout=0.3)
    assert info["ready"] is False and time.monotonic() - t >= 0.3


def test_calls_one_by_one_create_their_outputs_and_chain(native):
    base = f"/v1/sessions/{native.sid}"
    r = native.http.post(f"{base}/calls", json={"id": "one", "segments": [text("Hi:"), out("first", 3)]})
    assert r.status_code == 200 and r.json()["outputs"] == ["first"]
    r = native.http.post(f"{base}/calls", json={"id": "two", "segments": [inp("first"), out("second", 3)]})
    assert r.status_code == 200
    assert native.get("second")["ready"]
    info = native.http.get(f"{base}/calls/two").json()
    assert info["state"] == "done" and info["inputs"] == ["first"]
    assert native.http.get(f"{base}/calls/missing").status_code == 404
    r = native.http.post(f"{base}/calls", json={"id": "two", "segments": [out("third")]})
    assert r.status_code == 409


def test_a_stream_client_that_leaves_drops_its_subscription(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    app = create_app(engine)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        native = Native(http)
        native.submit(variables=[{"id": "long"}],
                      calls=[{"id": "c", "segments": [text("Go:"), out("long", 400)]}])
        with http.stream("GET", f"/v1/sessions/{native.sid}/variables/long/stream") as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: "))
        var = app.state.sessions.get(native.sid, None).graph.variable("long")
        deadline = time.monotonic() + 10
        while var.subscribers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert var.subscribers == []


# -- fewer round trips: a graph that opens its session, an answer that streams the values --------

def sse_payloads(body: str) -> list[dict]:
    return [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]


def test_a_graph_opens_the_session_it_names_and_a_refused_one_leaves_none(server):
    with server.http() as http:
        sid = uid("client-chosen")
        graph = {"session_id": sid, "open_session": {"idle_timeout_s": 60}, "variables": [{"id": "v"}],
                 "calls": [{"id": "c", "segments": [text("Hi:"), out("v", 4)]}]}
        assert http.post("/v1/graphs", json=graph).status_code == 200
        assert http.get(f"/v1/sessions/{sid}/variables/v", params={"timeout": 30}).json()["ready"]
        again = http.post("/v1/graphs", json={**graph, "calls": []})
        assert again.status_code == 409 and "in use" in again.json()["error"]["message"]
        assert http.delete(f"/v1/sessions/{sid}").status_code == 200
        # A graph that is refused (an input nobody declared) opens nothing.
        refused = {"session_id": uid("refused"), "open_session": {},
                   "calls": [{"id": "c", "segments": [inp("nope"), out("w", 4)]}], "variables": [{"id": "w"}]}
        r = http.post("/v1/graphs", json=refused)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        assert http.get(f"/v1/sessions/{refused['session_id']}/graph").status_code == 404
        assert http.post("/v1/graphs", json={"session_id": "bad id!", "open_session": {}}).status_code == 400


def test_a_streamed_answer_brings_the_waited_values_and_errors(native):
    too_long = "word " * 3000  # beyond the tiny model's context: its call fails
    r = native.http.post("/v1/graphs", json={
        "session_id": native.sid, "stream": True,
        "variables": [{"id": "a"}, {"id": "b"}, {"id": "big", "value": too_long}, {"id": "bad"}],
        "calls": [{"id": "ca", "segments": [text("A:"), out("a", 4)]},
                  {"id": "cb", "segments": [inp("a"), text(" B:"), out("b", 6)]},
                  {"id": "cbad", "segments": [inp("big"), out("bad", 4)]}],
        "fetches": [{"var": "b", "criterion": "latency", "wait": True},
                    {"var": "bad", "criterion": "latency", "wait": True},
                    {"var": "a", "criterion": "latency"}]})  # announced, not waited for
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[0] == {"accepted": {"session_id": native.sid, "variables": ["a", "b", "big", "bad"],
                                      "calls": ["ca", "cb", "cbad"]}}
    values = {e["variable"]["id"]: e["variable"] for e in events[1:]}
    assert set(values) == {"b", "bad"} and len(events) == 3
    assert values["b"]["ready"] and values["b"]["value"] == native.get("b")["value"]
    assert not values["bad"]["ready"] and "context length" in values["bad"]["error"]
    # A wait needs the stream that carries it; a refused graph is a plain JSON error.
    r = native.http.post("/v1/graphs", json={"session_id": native.sid, "variables": [{"id": "x"}],
                                             "fetches": [{"var": "x", "criterion": "latency", "wait": True}]})
    assert r.status_code == 400 and "stream=true" in r.json()["error"]["message"]
    r = native.http.post("/v1/graphs", json={"session_id": native.sid, "stream": True,
                                             "calls": [{"id": "c", "segments": [inp("nope"), out("y", 4)]}]})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")


def test_an_sdk_session_that_submits_and_gets_costs_one_request_and_its_delete(server, metric):
    import parrot as P

    def requests() -> dict[tuple[str, str], float]:
        page = httpx.get(f"{server.base_url}/metrics").text
        routes = [("POST", "/v1/sessions"), ("POST", "/v1/graphs"), ("DELETE", "/v1/sessions/{session_id}"),
                  ("GET", "/v1/sessions/{session_id}/variables/{var_id}")]
        return {r: metric(page, "parrot_http_requests_total", method=r[0], route=r[1]) for r in routes}

    write = P.SemanticFunction.from_template("Write about {{input:topic}}:{{output:text}}", name="write",
                                             inputs=["topic"], outputs={"text": P.Output(max_tokens=6)})
    summarize = P.SemanticFunction.from_template("Text:{{input:text}} Summary:{{output:summary}}", name="sum",
                                                 inputs=["text"], outputs={"summary": P.Output(max_tokens=4)})
    before = requests()
    with P.Parrot(server.base_url) as vm:
        draft = write("parrots")
        summary = summarize(draft)
        draft.will_get()  # several values got one after another: the one post brings them all
        value = summary.get()
        assert draft.get() and summary.get() == value  # no new request either
        sid = vm.session_id
    after = requests()
    assert {r: after[r] - before[r] for r in after} == {
        ("POST", "/v1/sessions"): 0, ("POST", "/v1/graphs"): 1, ("DELETE", "/v1/sessions/{session_id}"): 1,
        ("GET", "/v1/sessions/{session_id}/variables/{var_id}"): 0}
    assert httpx.get(f"{server.base_url}/v1/sessions/{sid}/graph").status_code == 404  # deleted on exit
    with P.Parrot(server.base_url) as vm:  # a session that sends nothing costs nothing
        pass
    assert requests() == after


def test_a_value_the_streamed_answer_did_not_bring_is_polled(server, metric, monkeypatch):
    import parrot as P
    from parrot import limits

    monkeypatch.setattr(limits, "MAX_WAIT_S", 0.05)  # the answer ends long before the value is set
    polls = lambda: metric(httpx.get(f"{server.base_url}/metrics").text, "parrot_http_requests_total",  # noqa: E731
                           method="GET", route="/v1/sessions/{session_id}/variables/{var_id}")
    before = polls()
    story = P.SemanticFunction.from_template("Once upon a time{{output:text}}", name="story",
                                             outputs={"text": P.Output(max_tokens=200, ignore_eos=True)})
    with P.Parrot(server.base_url):
        text = story().get()
    assert len(text) > 0 and polls() > before


def test_a_vm_closed_in_the_background_deletes_its_session_soon_after(server):
    import parrot as P

    story = P.SemanticFunction.from_template("Once upon a time{{output:text}}", name="story",
                                             outputs={"text": P.Output(max_tokens=4)})
    with P.Parrot(server.base_url, close_in_background=True) as vm:
        assert story().get()
        sid = vm.session_id
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.base_url}/v1/sessions/{sid}/graph").status_code != 404:
        assert time.monotonic() < deadline, "the session was never deleted"
        time.sleep(0.01)
