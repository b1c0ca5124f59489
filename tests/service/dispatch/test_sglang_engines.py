"""SGLang servers as the service's engines (stand-ins: SGLang's wire format over tiny builtin
engines): priorities and request ids on the wire, a task group's shared prefix prefilled once,
cancellation reaching the server, and a server that dies mid-stream with nothing lost."""

from __future__ import annotations

import json
import threading
import time

import httpx
import torch

from parrot.service.app import create_app
from parrot.service.engine.factory import EngineSpec, build_engine
from parrot.service.engine.sglang import SGLangEngine
from parrot.service.engine.tokenizer import ModelTokenizer
from tests.service.runtime.test_native_api import Native, inp, out, text


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def sglang(server, tokenizer) -> SGLangEngine:
    return SGLangEngine(server.url, tokenizer=ModelTokenizer(tokenizer, "tiny-llama"),
                        model_name="tiny-llama", load_interval_s=0.1)


def engines(http: httpx.Client) -> list[dict]:
    return http.get("/v1/engines").json()["data"]


def greedy_ids(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        return hf.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)[0, len(prompt):].tolist()


def test_a_server_is_found_by_its_spec_and_gets_priorities_and_request_ids(
        standin, tiny_engine_factory, serve_app):
    local, _ = tiny_engine_factory()
    server = standin()
    engine = build_engine(EngineSpec(kind="sglang", url=server.url), [local])
    assert (engine.kind, engine.model_name) == ("sglang", "tiny-llama")  # named after its model path
    assert engine.tokenizer is local.tokenizer
    with serve_app(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as http:
        native = Native(http)
        r = http.post("/v1/graphs", json={  # the fetch of "a" announced with the graph
            "session_id": native.sid, "variables": [{"id": "a"}, {"id": "b"}],
            "calls": [{"id": "asked", "segments": [text("Question:"), out("a", 4)]},
                      {"id": "background", "segments": [text("Note:"), out("b", 4)]}],
            "fetches": [{"var": "a", "criterion": "latency"}]})
        assert r.status_code == 200, r.text
        assert native.get("a", criterion="latency")["ready"]
        assert native.get("b", criterion="throughput")["ready"]
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    bodies = {b["rid"]: b for b in server.generate_bodies()}
    asked = next(b for rid, b in bodies.items() if rid.startswith("call-asked"))
    background = next(b for rid, b in bodies.items() if rid.startswith("call-background"))
    assert asked["priority"] > background["priority"]  # the fetched call outranks the other
    assert asked["input_ids"] == local.tokenizer.prompt_prefix_ids + local.tokenizer.encode("Question:")
    assert asked["sampling_params"]["max_new_tokens"] == 4 and asked["stream"] is True
    assert any(rid.startswith("cmpl-") for rid in bodies)  # the OpenAI route's request too


def test_a_task_groups_shared_prefix_is_prefilled_once_before_it_fans_out(
        standin, tokenizer, serve_app):
    server = standin()
    shared = "Summarize the following customer review of a phone in one short sentence, plainly. " * 2
    with serve_app(create_app(sglang(server, tokenizer))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        native = Native(http)
        maps = [{"id": f"map{i}", "segments": [text(shared), text(f"Review {i}: fine."), out(f"s{i}", 4)]}
                for i in range(4)]
        reduce = {"id": "reduce", "segments": [inp(f"s{i}") for i in range(4)] + [text("All:"), out("r", 4)]}
        native.submit(variables=[{"id": f"s{i}"} for i in range(4)] + [{"id": "r"}], calls=[*maps, reduce])
        assert native.get("r", criterion="throughput")["ready"]
    bodies = server.generate_bodies()
    prefills = [b for b in bodies if b["sampling_params"] == {"max_new_tokens": 0}]
    assert len(prefills) == 1
    prefix = prefills[0]["input_ids"]
    assert len(prefix) >= 32 and bodies.index(prefills[0]) == 0  # before any map ran
    map_bodies = [b for b in bodies if b.get("rid", "").startswith("call-map")]
    assert len(map_bodies) == 4 and all(b["input_ids"][:len(prefix)] == prefix for b in map_bodies)


def test_deleting_a_session_aborts_its_request_on_the_server(standin, tokenizer, serve_app):
    server = standin()
    with serve_app(create_app(sglang(server, tokenizer))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        native = Native(http)
        native.submit(variables=[{"id": "v"}],
                      calls=[{"id": "long", "segments": [text("Go:"), out("v", 2000)]}])
        wait_until(lambda: server.engine.load().num_running == 1, what="the request to run")
        assert http.delete(f"/v1/sessions/{native.sid}").status_code == 200
        wait_until(lambda: server.received("/abort_request"), what="the abort")
        wait_until(lambda: server.engine.load().num_running == 0, what="the server to stop it")
    [abort] = server.received("/abort_request")
    assert abort.body["rid"].startswith("call-long")


def test_a_native_call_resumes_on_another_server_when_one_dies(standin, tiny_engine_factory, tokenizer,
                                                              serve_app):
    doomed, survivor = standin(), standin()
    doomed.app.state.die_after_tokens = 5
    _, hf = tiny_engine_factory()  # the same weights the stand-ins serve
    app = create_app([sglang(doomed, tokenizer), sglang(survivor, tokenizer)], engine_probe_interval_s=0.2)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        native = Native(http)
        native.submit(variables=[{"id": "v"}],
                      calls=[{"id": "long", "segments": [text("Go:"), out("v", 24)]}])
        value = native.get("v")
        assert value["ready"], value
        engine_tokens = ModelTokenizer(tokenizer, "tiny-llama")
        prompt = engine_tokens.prompt_prefix_ids + engine_tokens.encode("Go:")
        assert value["value"] == engine_tokens.decode(greedy_ids(hf, prompt, 24))
        call = native.call("long")
        assert call["engine"] == "engine-1" and call["output_tokens"] == 24
        # The survivor was asked for the rest only: the prompt plus the 5 tokens it got first.
        [resumed] = [b for b in survivor.generate_bodies() if b["rid"].startswith("call-long")]
        assert len(resumed["input_ids"]) == len(prompt) + 5
        assert resumed["sampling_params"]["max_new_tokens"] == 19


def test_an_openai_stream_survives_its_engine_dying_and_the_engine_comes_back(
        standin, tiny_engine_factory, tokenizer, serve_app):
    doomed, survivor = standin(), standin()
    doomed.app.state.die_after_tokens = 6
    _, hf = tiny_engine_factory()
    app = create_app([sglang(doomed, tokenizer), sglang(survivor, tokenizer)], engine_probe_interval_s=0.2)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        doomed.app.state.healthy = False  # it stays down until told otherwise
        body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        streamed = "".join(c["text"] for e in events for c in e["choices"])
        ids = ModelTokenizer(tokenizer, "tiny-llama").encode("Once upon a time")
        assert streamed == tokenizer.decode(greedy_ids(hf, ids, 20), skip_special_tokens=True)
        assert events[-1]["usage"]["completion_tokens"] == 20
        assert events[-1]["usage"]["prompt_tokens"] == len(ids)
        down = {e["url"]: e["down"] for e in engines(http)}
        assert down[survivor.url] is None and doomed.url in down[doomed.url]
        # Marked down, it gets no work ...
        before = len(doomed.generate_bodies())
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and len(doomed.generate_bodies()) == before
        # ... until it answers again.
        doomed.app.state.healthy, doomed.app.state.die_after_tokens = True, None
        wait_until(lambda: all(e["down"] is None for e in engines(http)), what="the engine to return")


def test_a_server_down_at_start_is_probed_until_it_answers(standin, tokenizer, serve_app):
    late, ready = standin(), standin()
    late.app.state.healthy = False  # /health answers 503, as while SGLang loads its model
    app = create_app([sglang(late, tokenizer), sglang(ready, tokenizer)], engine_probe_interval_s=0.2)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        down = {e["url"]: e["down"] for e in engines(http)}
        assert "did not start" in down[late.url] and down[ready.url] is None
        results = []

        def complete() -> None:
            results.append(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code)

        threads = [threading.Thread(target=complete) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200, 200, 200] and not late.generate_bodies()
        late.app.state.healthy = True
        wait_until(lambda: all(e["down"] is None for e in engines(http)), what="the late engine")
