"""``response_format`` on the OpenAI routes and ``json_schema`` sampling on the native API,
through a live server on a tiny random-weight model (and through an engine process)."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from parrot.service.app import create_app
from parrot.service.engine.remote.worker import create_worker_app
from tests.engine.test_json_schema import PERSON, check
from tests.service.runtime.test_native_api import Native, text

CHAT = [{"role": "user", "content": "Describe a person."}]


def json_schema_format(schema: dict = PERSON, name: str = "person", strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def test_chat_json_schema_output_validates(live_server):
    client = live_server.client()
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        reply = client.chat.completions.create(model=live_server.model, messages=CHAT, max_tokens=200,
                                               response_format=json_schema_format(), **sampling)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        check(json.loads(choice.message.content), PERSON)


def test_streamed_json_schema_output_equals_the_whole_one(live_server):
    client = live_server.client()
    kwargs = dict(model=live_server.model, messages=CHAT, max_tokens=200, temperature=0,
                  response_format=json_schema_format())
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, **kwargs) if c.choices)
    assert streamed == whole
    check(json.loads(streamed), PERSON)


def test_completions_route_takes_response_format_too(live_server):
    with live_server.http() as http:
        r = http.post("/v1/completions", json={
            "prompt": ["Once upon a time", "In a distant galaxy"], "max_tokens": 200, "temperature": 0,
            "response_format": json_schema_format()})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        check(json.loads(choice["text"]), PERSON)


def test_json_object_mode_gives_an_object(live_server):
    reply = live_server.client().chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=64,
        temperature=0, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


class Pet(BaseModel):
    name: Annotated[str, Field(max_length=6)]
    kind: Literal["cat", "dog", "parrot"]
    age: Annotated[int, Field(ge=0, le=30)]
    vaccinated: bool


def test_openai_client_parse_with_a_pydantic_model(live_server):
    # What structured-output integrations do: a pydantic model becomes a strict json_schema.
    reply = live_server.client().chat.completions.parse(
        model=live_server.model, messages=CHAT, max_tokens=100, temperature=0, response_format=Pet)
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet) and reply.choices[0].finish_reason == "stop"


async def test_constrained_and_plain_requests_together(live_server):
    client = live_server.async_client()
    plain = dict(model=live_server.model, messages=CHAT, max_tokens=16, temperature=0)
    alone = (await client.chat.completions.create(**plain)).choices[0].message.content
    replies = await asyncio.gather(
        *(client.chat.completions.create(**plain) for _ in range(3)),
        *(client.chat.completions.create(**plain | {"max_tokens": 200},
                                         response_format=json_schema_format()) for _ in range(3)),
    )
    assert [r.choices[0].message.content for r in replies[:3]] == [alone] * 3
    for r in replies[3:]:
        check(json.loads(r.choices[0].message.content), PERSON)


@pytest.mark.parametrize("response_format,param,says", [
    (json_schema_format({"type": "wizard"}), None, "JSON schema is invalid: Invalid type: wizard"),
    (json_schema_format({"not": {"type": "string"}}), None, "Unimplemented keys"),
    (json_schema_format({"$ref": "#/$defs/gone"}), None, "gone"),
    ({"type": "xml"}, "response_format", "does not match any of the expected tags"),
    ({"type": "json_schema"}, "response_format.json_schema.json_schema", "Field required"),
    (json_schema_format(name="no spaces allowed"), "response_format.json_schema.json_schema.name",
     "should match pattern"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
     "response_format.json_schema.json_schema.schema", "valid dictionary"),
])
def test_bad_response_format_is_400_and_harms_nothing(live_server, response_format, param, says):
    with live_server.http() as http:
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "stream": stream,
                                                        "response_format": response_format})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert says in error["message"] and error["param"] == param, error
        r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 200, "temperature": 0,
                                                    "response_format": json_schema_format()})
        assert r.status_code == 200
        check(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    assert live_server.engine.load().num_running == 0


def test_native_output_with_a_json_schema(live_server):
    with live_server.http() as http:
        native = Native(http)
        native.submit(variables=[{"id": "who"}, {"id": "bad"}], calls=[
            {"id": "describe", "segments": [text("A person: "), {
                "type": "output", "var": "who", "sampling": {"max_tokens": 200, "json_schema": PERSON}}]},
            {"id": "broken", "segments": [text("A person: "), {
                "type": "output", "var": "bad", "sampling": {"json_schema": {"type": "wizard"}}}]},
        ])
        check(json.loads(native.get("who")["value"]), PERSON)
        failed = native.get("bad", expect=424)
        assert "JSON schema is invalid" in json.dumps(failed)


def test_json_schema_travels_to_an_engine_process(tiny_engine_factory, serve_app):
    with ExitStack() as stack:
        service = stack.enter_context(serve_app(create_app()))
        engine = tiny_engine_factory()[0]
        stack.enter_context(serve_app(
            lambda url: create_worker_app(engine, service_url=service, advertise_url=url)))
        with httpx.Client(base_url=service, timeout=30) as http:
            deadline = time.monotonic() + 30
            while not http.get("/v1/engines").json()["data"]:
                assert time.monotonic() < deadline, "the engine process did not register"
                time.sleep(0.05)
            client = openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)
            reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=200,
                                                   temperature=0, response_format=json_schema_format())
            check(json.loads(reply.choices[0].message.content), PERSON)
            assert engine.grammars.num_compiled == 1  # the engine process did the constraining
            # A bad schema is the client's 400; the engine stays registered.
            with pytest.raises(openai.BadRequestError, match="JSON schema is invalid"):
                client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8,
                                               response_format=json_schema_format({"type": "wizard"}))
            assert len(http.get("/v1/engines").json()["data"]) == 1
