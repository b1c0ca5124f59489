"""Prefill ahead: a call waiting for inputs has its known prompt start prefilled on its engine
(live service, tiny model); asserted through the engine's cache and the call's cached tokens."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from contextlib import contextmanager

import httpx
import pytest

from parrot.service.app import create_app
from parrot.service.engine.base import EngineError
from parrot.service.engine.remote.worker import create_worker_app

# About 40 tokens of static text before the call's first input.
INSTRUCTIONS = ("You are a careful analyst. Read the notes below, weigh each claim, and answer "
                "with one short sentence that a busy reader can act on. Notes: ")


def text(t):
    return {"type": "text", "text": t}


def inp(var):
    return {"type": "input", "var": var}


def out(var, max_tokens=8):
    return {"type": "output", "var": var, "sampling": {"max_tokens": max_tokens, "temperature": 0,
                                                       "ignore_eos": True}}


class Service:
    """A live service on a tiny engine whose ``prefill`` calls are counted."""

    def __init__(self, base_url: str, engine) -> None:
        self.engine = engine
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.sid = self.http.post("/v1/sessions", json={}).json()["id"]

    def submit(self, variables, calls):
        r = self.http.post("/v1/graphs", json={"session_id": self.sid, "variables": variables,
                                               "calls": calls})
        assert r.status_code == 200, r.text

    def set(self, var, value):
        r = self.http.post(f"/v1/sessions/{self.sid}/variables/{var}", json={"value": value})
        assert r.status_code == 200, r.text

    def get(self, var, criterion="throughput"):
        r = self.http.get(f"/v1/sessions/{self.sid}/variables/{var}",
                          params={"criterion": criterion, "timeout": 30})
        assert r.status_code == 200, r.text
        assert r.json()["ready"], r.json()
        return r.json()["value"]

    def call(self, call_id):
        calls = self.http.get(f"/v1/sessions/{self.sid}/graph").json()["calls"]
        return next(c for c in calls if c["id"] == call_id)


@pytest.fixture
def service_factory(tiny_engine_factory, serve_app):
    """``start(prefill_ahead_min_tokens=16, prefill=None, prefix_control=True)``: a Service;
    ``prefill`` replaces the engine's own, ``prefix_control=False`` hides its prefix control."""
    started = []

    @contextmanager
    def start(prefill_ahead_min_tokens=16, prefill=None, prefix_control=True):
        engine, _ = tiny_engine_factory()
        engine.prefills = []  # the token ids of each prefill asked for, once it is done
        own = prefill or engine.prefill

        async def counted(token_ids, priority=0):
            await own(token_ids, priority)
            engine.prefills.append(list(token_ids))

        engine.prefill = counted
        engine.supports_prefix_control = prefix_control
        app = create_app(engine, prefill_ahead_min_tokens=prefill_ahead_min_tokens)
        with serve_app(app) as url:
            service = Service(url, engine)
            started.append(service)
            yield service

    yield start
    for service in started:
        service.http.close()


def uid(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def waiting_call(instructions=INSTRUCTIONS):
    """A graph of one call that waits for a value the client sets later."""
    return ([{"id": "notes"}, {"id": "answer"}],
            [{"id": "ask", "segments": [text(instructions), inp("notes"), text("\nAnswer:"), out("answer")]}])


def wait_for(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def static_start(engine, instructions=INSTRUCTIONS):
    return list(engine.tokenizer.prompt_prefix_ids) + engine.tokenizer.encode(instructions)


def test_a_waiting_calls_static_start_is_prefilled_before_its_input_is_set(service_factory):
    with service_factory(prefill_ahead_min_tokens=None) as reference:
        reference.submit(*waiting_call())
        reference.set("notes", "the river rose two metres overnight")
        expected = reference.get("answer")
        assert reference.call("ask")["cached_tokens"] == 0 and not reference.engine.prefills
    with service_factory() as service:
        service.submit(*waiting_call())
        start = static_start(service.engine)
        assert len(start) >= 32
        wait_for(lambda: service.engine.prefills)
        assert service.engine.prefills == [start]  # on the engine, before the input is set
        assert service.call("ask")["state"] == "pending"
        service.set("notes", "the river rose two metres overnight")
        assert service.get("answer") == expected  # greedy output unchanged
        call = service.call("ask")
        assert call["cached_tokens"] == len(start)  # only the input and the rest were prefilled
        assert call["timings"]["first_token"] >= call["timings"]["started"]


def test_a_dependent_calls_start_is_prefilled_while_its_producer_generates(service_factory):
    with service_factory() as service:
        service.submit(
            [{"id": "topic", "value": "flood defences"}, {"id": "draft"}, {"id": "answer"}],
            [{"id": "write",
              "segments": [text("Write a note on "), inp("topic"), text(":"), out("draft", 24)]},
             {"id": "ask", "segments": [text(INSTRUCTIONS), inp("draft"), text("\nAnswer:"), out("answer")]}])
        service.get("answer")  # fetched for throughput: the producer runs as throughput work
        start = static_start(service.engine)
        assert service.engine.prefills == [start]
        assert service.call("ask")["cached_tokens"] == len(start)


def test_known_start_grows_with_inputs_set_in_order_and_is_never_prefilled_twice(service_factory):
    segments = [text(INSTRUCTIONS), inp("a"), text("\nMore notes: "), inp("b"), text("\nAnswer:"),
                out("answer")]
    with service_factory() as service:
        service.submit([{"id": "a"}, {"id": "b"}, {"id": "answer"}, {"id": "answer2"}],
                       [{"id": "ask", "segments": segments},
                        {"id": "ask2", "segments": [*segments[:-1], out("answer2")]}])  # same start
        start = static_start(service.engine)
        wait_for(lambda: service.engine.prefills)
        time.sleep(0.3)  # a second prefill of the same start would come now
        assert service.engine.prefills == [start]  # once for both calls
        notes = "the eastern levee held but the western one needs sandbags before Friday"
        service.set("a", notes)
        encode = service.engine.tokenizer.encode
        grown = start + encode(notes) + encode("\nMore notes: ")
        wait_for(lambda: len(service.engine.prefills) == 2)
        assert service.engine.prefills[1] == grown
        service.set("b", "the pumps arrive on Thursday")
        service.get("answer")
        service.get("answer2")
        assert service.call("ask")["cached_tokens"] >= len(grown)
        assert len(service.engine.prefills) == 2


@pytest.mark.parametrize("case", ["short start", "no prefix control", "disabled"])
def test_nothing_is_prefilled_ahead(service_factory, case):
    options = {"no prefix control": {"prefix_control": False},
               "disabled": {"prefill_ahead_min_tokens": None}}.get(case, {})
    with service_factory(**options) as service:
        service.submit(*waiting_call("Notes: " if case == "short start" else INSTRUCTIONS))
        time.sleep(0.5)  # a prefill ahead would have run by now
        assert service.engine.num_steps == 0 and not service.engine.prefills
        service.set("notes", "the river rose two metres overnight")
        assert service.get("answer")
        assert service.call("ask")["cached_tokens"] == 0


def test_a_failing_prefill_never_fails_the_call(service_factory):
    async def broken(token_ids, priority=0):
        raise EngineError("the prefill broke")

    with service_factory(prefill_ahead_min_tokens=None) as reference:
        reference.submit(*waiting_call())
        reference.set("notes", "the river rose two metres overnight")
        expected = reference.get("answer")
    with service_factory(prefill=broken) as service:
        service.submit(*waiting_call())
        time.sleep(0.3)
        service.set("notes", "the river rose two metres overnight")
        assert service.get("answer") == expected
        assert service.call("ask")["state"] == "done"


def test_an_engine_process_prefills_ahead_too(tiny_engine_factory, serve_app):
    engine, _ = tiny_engine_factory()
    with serve_app(create_app([], engine_wait_s=30)) as url:

        def worker(worker_url):
            return create_worker_app(engine, service_url=url, advertise_url=worker_url)

        with serve_app(worker), httpx.Client(base_url=url, timeout=30) as http:
            wait_for(lambda: http.get("/v1/engines").json()["data"])
            service = Service(url, engine)
            service.submit(*waiting_call())
            start = static_start(engine)
            wait_for(lambda: engine.num_steps > 0 and not engine.scheduler.has_work)
            service.set("notes", "the river rose two metres overnight")
            service.get("answer")
            assert service.call("ask")["cached_tokens"] == len(start)
            service.http.close()


def test_the_call_runs_on_the_engine_its_start_was_prefilled_on(tiny_engine_factory, serve_app):
    engines = [tiny_engine_factory()[0] for _ in range(2)]
    prefilled: list[int] = []  # which engine each prefill went to
    for i, engine in enumerate(engines):
        async def counted(token_ids, priority=0, own=engine.prefill, i=i):
            await own(token_ids, priority)
            prefilled.append(i)

        engine.prefill = counted
    with serve_app(create_app(engines)) as url:
        service = Service(url, engines[0])
        ids = [e["id"] for e in service.http.get("/v1/engines").json()["data"]]
        # While the first engine is busy, the waiting call's start goes to the second; once the
        # call runs (both idle again), prefix affinity takes it there too.
        other = threading.Thread(target=service.http.post, args=("/v1/completions",), kwargs={
            "json": {"prompt": "Count:", "max_tokens": 300, "ignore_eos": True}})
        other.start()
        wait_for(lambda: engines[0].scheduler.has_work)
        service.submit(*waiting_call())
        wait_for(lambda: prefilled)
        other.join()
        service.set("notes", "the river rose two metres overnight")
        service.get("answer")
        call = service.call("ask")
        assert prefilled == [1] and call["engine"] == ids[1]
        assert call["cached_tokens"] == len(static_start(engines[0]))
        service.http.close()


def test_a_prefill_still_under_way_when_the_call_starts_is_stopped(service_factory):
    seen = []  # "started", then "cancelled" once the call starts

    async def slow(token_ids, priority=0):
        seen.append("started")
        try:
            await asyncio.sleep(60)  # an engine that never gets round to it
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with service_factory(prefill_ahead_min_tokens=None) as reference:
        reference.submit(*waiting_call())
        reference.set("notes", "the river rose two metres overnight")
        expected = reference.get("answer")
    with service_factory(prefill=slow) as service:
        service.submit(*waiting_call())
        wait_for(lambda: seen)
        service.set("notes", "the river rose two metres overnight")
        assert service.get("answer") == expected
        wait_for(lambda: seen == ["started", "cancelled"])
