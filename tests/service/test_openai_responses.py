"""``/v1/responses`` on a live server on a tiny random-weight model, driven by the official
``openai`` client: create, stream (the documented event sequence), continue a conversation
with ``previous_response_id``, retrieve, function calls, and bad input."""

from __future__ import annotations

import json

import openai
import pytest

from parrot.service.api.responses.protocol import ResponseObject
from parrot.service.api.responses.store import ResponseStore, StoredResponse
from tests.engine.test_json_schema import check

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
                  "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER_PARAMS}


def test_create_with_a_string_input_and_retrieve(live_server):
    client = live_server.client()
    resp = client.responses.create(model=live_server.model, input="Say hi", instructions="Be brief.",
                                   max_output_tokens=6, temperature=0, metadata={"k": "v"})
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == live_server.model
    assert resp.status in ("completed", "incomplete")
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert resp.output_text == item.content[0].text
    assert resp.usage.output_tokens > 0 and resp.usage.total_tokens == (resp.usage.input_tokens
                                                                        + resp.usage.output_tokens)
    assert resp.instructions == "Be brief." and resp.metadata == {"k": "v"}
    if resp.usage.output_tokens == 6:
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    again = client.responses.retrieve(resp.id)
    assert again.id == resp.id and again.output_text == resp.output_text


def test_list_input_with_content_parts_matches_the_chat_route(live_server):
    client = live_server.client()
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
             {"type": "message", "role": "user", "content": "Name a colour."}]
    resp = client.responses.create(model=live_server.model, input=items, max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(
        model=live_server.model, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "Name a colour."}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_previous_response_id_continues_the_conversation(live_server):
    client = live_server.client()
    first = client.responses.create(model=live_server.model, input="My name is Ada.", max_output_tokens=5,
                                    temperature=0)
    second = client.responses.create(model=live_server.model, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=5, temperature=0)
    assert second.previous_response_id == first.id
    whole = client.chat.completions.create(
        model=live_server.model, max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": "My name is Ada."},
                  {"role": "assistant", "content": first.output_text},
                  {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == whole.usage.prompt_tokens
    assert second.output_text == whole.choices[0].message.content
    unstored = client.responses.create(model=live_server.model, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=live_server.model, input="x", previous_response_id=unstored.id)
    assert "previous_response_id" in str(info.value)


def test_streamed_events_follow_the_documented_sequence(live_server):
    client = live_server.client()
    kwargs = dict(model=live_server.model, input="Tell me a story", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:4 + len(deltas)]) == {"response.output_text.delta"} and deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.status == whole.status
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == whole.output_text  # stored when streamed too


def test_stream_helper_gets_the_final_response(live_server):
    with live_server.client().responses.stream(model=live_server.model, input="Hi", max_output_tokens=5,
                                               temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text


def test_function_calls_and_their_outputs(live_server):
    client = live_server.client()
    resp = client.responses.create(model=live_server.model, input="Weather in Paris?", tools=[WEATHER],
                                   tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                   temperature=0)
    [call] = resp.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    check(json.loads(call.arguments), WEATHER_PARAMS)
    follow = client.responses.create(
        model=live_server.model, previous_response_id=resp.id, tools=[WEATHER], max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], temperature=0)
    assert follow.status in ("completed", "incomplete") and follow.output
    events = list(client.responses.create(
        model=live_server.model, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=60, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments and "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed" and events[-1].response.output[0].name == "get_weather"


@pytest.mark.parametrize(("body", "field"), [
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
])
def test_bad_requests_are_400_naming_the_field(live_server, body, field):
    with live_server.http() as http:
        r = http.post("/v1/responses", json={"model": live_server.model, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] + str(error.get("param"))


def test_store_keeps_the_most_recent_per_tenant():
    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put("a", StoredResponse(ResponseObject(id=f"r{i}", model="m"), []))
    assert store.get("a", "r0") is None and store.get("a", "r1") is not None
    store.put("a", StoredResponse(ResponseObject(id="r3", model="m"), []))  # r1 was used last: r2 goes
    assert store.get("a", "r2") is None and store.get("a", "r1") is not None
    assert store.get("b", "r1") is None  # another tenant sees none of them
    assert len(store) == 2


def test_text_format_json_schema_and_delete(live_server):
    client = live_server.client()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    resp = client.responses.create(model=live_server.model, input="Is it ok?", max_output_tokens=20,
                                   text={"format": {"type": "json_schema", "name": "answer",
                                                    "schema": schema}})
    assert isinstance(json.loads(resp.output_text)["ok"], bool)
    assert resp.text.format.type == "json_schema"
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_a_tenant_never_sees_another_tenants_responses(tiny_engine_factory, serve_app):
    from parrot.service.app import create_app
    from parrot.service.tenancy import TenantConfig, Tenants

    engine, _ = tiny_engine_factory()
    tenants = Tenants({"alice": TenantConfig(keys=["sk-alice"]), "bob": TenantConfig(keys=["sk-bob"])})
    with serve_app(create_app(engine, tenants=tenants)) as url:
        alice = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-alice", max_retries=0)
        bob = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-bob", max_retries=0)
        resp = alice.responses.create(model=engine.model_name, input="secret", max_output_tokens=2)
        assert alice.responses.retrieve(resp.id).id == resp.id
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(resp.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model=engine.model_name, input="x", previous_response_id=resp.id)
