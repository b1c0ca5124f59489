"""Tool calling on /v1/chat/completions through a live server on a tiny random-weight model,
driven by the official ``openai`` client (shapes; arguments follow the tool's schema)."""

from __future__ import annotations

import json

import pytest

from tests.engine.test_json_schema import check

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                            "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                             "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME["function"]["parameters"]}


def check_calls(message, names=("get_weather", "get_time")):
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
        assert call.function.name in names
        check(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_required_and_named_tool_choice_give_calls(live_server):
    client = live_server.client()
    for choice, names in (("required", ("get_weather", "get_time")),
                          ({"type": "function", "function": {"name": "get_time"}}, ("get_time",))):
        reply = client.chat.completions.create(
            model=live_server.model, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
            parallel_tool_calls=False, max_tokens=200, temperature=0)
        [result] = reply.choices
        assert result.finish_reason == "tool_calls"
        check_calls(result.message, names)
        assert len(result.message.tool_calls) == 1  # parallel calls off
        assert reply.usage.completion_tokens > 0


def test_parallel_calls_may_be_several_each_valid(live_server):
    reply = live_server.client().chat.completions.create(
        model=live_server.model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=400, temperature=1.0, seed=3)
    [result] = reply.choices
    if result.finish_reason == "tool_calls":
        check_calls(result.message)
        assert len({c.id for c in result.message.tool_calls}) == len(result.message.tool_calls)
    else:  # a random model may keep calling until max_tokens: then the text comes back as is
        assert result.finish_reason == "length" and result.message.content


def test_auto_answers_text_or_calls(live_server):
    client = live_server.client()
    seen = set()
    for seed in range(4):
        reply = client.chat.completions.create(
            model=live_server.model, messages=ASK, tools=[WEATHER], tool_choice="auto",
            parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=seed)
        [result] = reply.choices
        if result.message.tool_calls:
            assert result.finish_reason == "tool_calls"
            check_calls(result.message)
            seen.add("calls")
        else:
            assert isinstance(result.message.content, str) and result.finish_reason in ("stop", "length")
            assert not result.message.content.startswith('{"content"')  # unwrapped when whole
            seen.add("text")
    assert seen


def test_tool_choice_none_is_plain_text(live_server):
    reply = live_server.client().chat.completions.create(
        model=live_server.model, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5,
        temperature=0)
    assert reply.choices[0].message.tool_calls in (None, [])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_calls_reassemble_to_the_whole_reply(live_server):
    client = live_server.client()
    kwargs = dict(model=live_server.model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  parallel_tool_calls=False, max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    assert call["id"] is None and piece.type == "function" and piece.function.name
                    call["id"], call["name"] = piece.id, piece.function.name
                call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2  # in pieces


def test_stream_helper_of_the_official_client_reassembles_calls(live_server):
    tools = [WEATHER]
    with live_server.client().chat.completions.stream(
            model=live_server.model, messages=ASK, tools=tools, tool_choice="required",
            parallel_tool_calls=False, max_tokens=200, temperature=0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, ("get_weather",))


def test_tool_messages_in_history_are_rendered_and_answered(live_server):
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    client = live_server.client()
    reply = client.chat.completions.create(model=live_server.model, messages=history, tools=[WEATHER],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    plain = client.chat.completions.create(model=live_server.model, messages=history, max_tokens=4,
                                           temperature=0)
    assert plain.choices[0].message.content is not None
    # The rendered prompt holds the call and its result.
    prompt = reply.usage.prompt_tokens
    assert prompt > plain.usage.prompt_tokens  # the tool list and format come on top


def test_fallback_rendering_lists_tools_calls_and_results(live_server):
    from parrot.service.api.openai.protocol import ChatCompletionRequest
    from parrot.service.api.openai.tools import chat_template_messages

    request = ChatCompletionRequest(messages=[
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"}], tools=[WEATHER])
    messages, tools = chat_template_messages(request.messages, request.tool_use, request.tools,
                                             native_tools=False)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert "get_weather: Weather forecast" in messages[0]["content"]
    assert messages[2]["content"] == ('Checking.\n{"tool_calls": [{"name": "get_weather", '
                                      '"arguments": {"city": "Paris", "days": 3}}]}')
    results = [json.loads(line) for line in messages[3]["content"].splitlines()[1:]]
    assert results == [{"tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
                       {"tool_call_id": "call_2", "name": None, "content": "rain"}]
    native, tools = chat_template_messages(request.messages, request.tool_use, request.tools,
                                           native_tools=True)
    assert tools == [WEATHER] and native[2]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris", "days": 3}
    assert native[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert "You can call these tools" not in native[0]["content"]  # the template lists them


@pytest.mark.parametrize(("extra", "field"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
])
def test_bad_tool_requests_are_400_naming_the_problem(live_server, extra, field):
    body = {"model": live_server.model, "messages": ASK, "max_tokens": 4, **extra}
    with live_server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in (error.get("message") or "") + str(error.get("param"))
